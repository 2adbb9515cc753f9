"""LatentDataset: normalised latents from a memory map, its refusals, and the peak memory of two processes
reading a latent file larger than a gigabyte."""

from __future__ import annotations

import json
import pickle
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusionflow.data.latents import LatentDataset, read_meta
from diffusionflow.errors import ConfigError
from diffusionflow.paths import CONFIG_DIR

SHAPE = (4, 8, 8)


def _folder(
    root: Path,
    count: int = 6,
    labels: np.ndarray | None = None,
    shape: tuple[int, ...] = SHAPE,
    write: bool = True,
    **meta_entries,
) -> Path:
    """A latent folder as encode writes it: raw m(x) rows, labels, meta.json (edm2 with its statistics)."""
    root.mkdir(parents=True, exist_ok=True)
    latents = np.lib.format.open_memmap(
        root / "latents.npy", mode="w+", dtype=np.float32, shape=(count, *shape)
    )
    if write:
        latents[:] = np.random.default_rng(0).normal(3.0, 2.0, size=latents.shape)
    latents.flush()
    np.save(root / "labels.npy", np.arange(count) % 3 if labels is None else labels)
    meta = {
        "vae": "sd-vae-ft-ema",
        "vae_weights_sha256": "0" * 64,
        "normalisation": "edm2",
        "mean": [3.0, 2.0, 1.0, 0.0],
        "std": [4.0, 2.0, 1.0, 0.5],
        "data_mean": [3.0, 2.0, 1.0, 0.0],
        "data_std": [2.0, 1.0, 0.5, 0.25],
        "scaling_factor": 0.25,
        "image_resolution": 64,
        "latent_shape": list(shape),
        "flip_copies": False,
        "source": "/data/images",
        "count": count,
        "num_classes": 3,
        "done": True,
        **meta_entries,
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_items_are_normalised_rows_with_their_labels(tmp_path: Path) -> None:
    root = _folder(tmp_path / "latents")
    raw = np.load(root / "latents.npy")
    data = LatentDataset(root, expect_vae="sd-vae-ft-ema")
    assert len(data) == 6 and data.shape == SHAPE and data.num_classes == 3
    z, y = data[4]
    mean, std = np.array([3.0, 2.0, 1.0, 0.0])[:, None, None], np.array([4.0, 2.0, 1.0, 0.5])[:, None, None]
    np.testing.assert_allclose(z.numpy(), (raw[4] - mean) / std, rtol=1e-6)
    assert z.dtype == torch.float32 and y.dtype == torch.int64 and y == 1
    sd = LatentDataset(root, normalisation="sd")  # mean 0, std 1/scaling_factor = 4
    np.testing.assert_allclose(sd[4][0].numpy(), raw[4] * 0.25, rtol=1e-6)


def test_unlabelled_folders_give_label_zero(tmp_path: Path) -> None:
    root = _folder(tmp_path / "latents", labels=np.full(6, -1), num_classes=0)
    data = LatentDataset(root)
    assert data.num_classes == 0 and [int(data[i][1]) for i in range(6)] == [0] * 6


def test_refusals_name_the_key_and_value(tmp_path: Path) -> None:
    root = _folder(tmp_path / "latents")
    with pytest.raises(ConfigError, match=r"vae='sd-vae-ft-ema', but the experiment's vae.config='digits'"):
        LatentDataset(root, expect_vae="digits")
    _folder(root, done=False)
    with pytest.raises(ConfigError, match=r"done=false .* rerun the same `python -m diffusionflow.encode"):
        LatentDataset(root)
    _folder(root, count=5)
    np.save(root / "labels.npy", np.zeros(6, dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels.npy has shape \(6,\), meta.json says \(5,\)"):
        LatentDataset(root)
    with pytest.raises(FileNotFoundError, match=f"latent folder {tmp_path} has no meta.json: write it with"):
        read_meta(tmp_path)


def test_the_latents_config_trains_on_a_folder(tmp_path: Path) -> None:
    """conf/data/latents.yaml: a DiffusionDataModule over the folder, carrying the vae node for decoding."""
    _folder(tmp_path / "latents", count=8)
    data = OmegaConf.load(CONFIG_DIR / "data" / "latents.yaml")
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": data})
    cfg.data.merge_with({"shape": list(SHAPE), "num_classes": 3, "batch_size": 4, "num_workers": 0})
    dm = instantiate(cfg.data)
    assert dm.vae == {"config": "sd-vae-ft-ema", "weights_path": None, "normalisation": "edm2"}
    dm.setup("fit")
    z, y = next(iter(dm.train_dataloader()))
    assert z.shape == (4, *SHAPE) and y.dtype == torch.int64
    cfg.data.vae.config = "digits"
    with pytest.raises(ConfigError, match="vae.config='digits'"):
        instantiate(cfg.data).setup("fit")


def _read_rows(rank: int, data: LatentDataset, out: Path, reads: int) -> None:
    """In a fresh process: peak RSS (ru_maxrss, KiB on Linux) at the start and after ``reads`` items."""
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    generator = torch.Generator().manual_seed(rank)
    total = 0.0
    for index in torch.randint(len(data), (reads,), generator=generator).tolist():
        total += float(data[index][0].sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (out / f"rss-{rank}.json").write_text(json.dumps({"start_kib": start, "peak_kib": peak, "sum": total}))


@pytest.mark.slow
def test_two_processes_read_a_large_file_without_loading_it(tmp_path: Path) -> None:
    """A 1.15 GB latent file (float32 (70000, 4, 32, 32), sparse: no disk used) read by two processes,
    each drawing 400 random items: neither process's peak RSS grows by more than 300 MiB over its start
    (imports), and the dataset they receive pickled is small (the maps are not in it)."""
    root = _folder(tmp_path / "latents", 70000, np.zeros(70000, dtype=np.int64), (4, 32, 32), write=False)
    size = (root / "latents.npy").stat().st_size
    data = LatentDataset(root)
    data[0]  # the maps open in this process; pickling must still leave them out
    assert size > 1.1e9 and len(pickle.dumps(data)) < 100_000
    mp.start_processes(_read_rows, args=(data, tmp_path, 400), nprocs=2, start_method="spawn")
    for rank in range(2):
        rss = json.loads((tmp_path / f"rss-{rank}.json").read_text())
        grown, peak = (rss["peak_kib"] - rss["start_kib"]) * 1024, rss["peak_kib"] * 1024
        print(f"rank {rank}: peak RSS {peak / 2**20:.0f} MiB, grown by {grown / 2**20:.1f} MiB while reading")
        assert grown < 300 * 2**20  # the file is 1094 MiB
