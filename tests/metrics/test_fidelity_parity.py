"""Our FID / KID / IS, and the Inception features themselves (bit for bit), against torch-fidelity's
``calculate_metrics`` on the same PNGs and weights, the offline weights error, and ``to_uint8``'s
rounding.

Inception on CPU costs ~0.15 s per image, so both sides extract the two sets once (module fixtures)
and every assertion reuses those numbers.
"""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
import torch_fidelity.utils as tf_utils
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from diffusionflow.metrics import (
    WEIGHTS_FILENAME,
    FrechetStats,
    InceptionV3,
    frechet_distance,
    image_batches,
    inception_score,
    kernel_inception_distance,
    prefetch_inception,
    to_uint8,
)

KID_SUBSETS, KID_SUBSET_SIZE, ISC_SPLITS = 20, 48, 4
REL = 1e-4


@pytest.fixture(scope="module")
def theirs_run(
    image_dirs: dict[str, Path], inception_weights: Path
) -> tuple[dict[str, float], list[dict[str, torch.Tensor]]]:
    """torch-fidelity's metrics, and the features its extractor gave for input1 and input2 (recorded
    on the way, from the function that runs its extractor over a dataset)."""
    features = []
    extract = tf_utils.get_featuresdict_from_dataset

    def recording(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        features.append(extract(*args, **kwargs))
        return features[-1]

    with mock.patch.object(tf_utils, "get_featuresdict_from_dataset", recording):
        metrics = torch_fidelity.calculate_metrics(
            input1=str(image_dirs["a"]),
            input2=str(image_dirs["b"]),
            fid=True,
            kid=True,
            isc=True,
            cuda=False,
            feature_extractor_weights_path=str(inception_weights),
            kid_subsets=KID_SUBSETS,
            kid_subset_size=KID_SUBSET_SIZE,
            isc_splits=ISC_SPLITS,
            cache=False,
            verbose=False,
            datasets_download=False,
            save_cpu_ram=True,
        )
    return metrics, features


@pytest.fixture(scope="module")
def theirs(theirs_run: tuple[dict[str, float], list[dict[str, torch.Tensor]]]) -> dict[str, float]:
    return theirs_run[0]


@pytest.fixture(scope="module")
def ours(image_dirs: dict[str, Path], inception_weights: Path) -> dict[str, dict]:
    """Per set: streamed FrechetStats, and the features and logits for KID and IS."""
    net = InceptionV3(inception_weights)
    out = {}
    for name, folder in image_dirs.items():
        stats, feats, logits = FrechetStats(net.feature_dim), [], []
        for batch in image_batches(folder, batch_size=64):
            f, l = net.features_and_logits(batch)
            stats.update(f)
            feats.append(f)
            logits.append(l)
        out[name] = {"stats": stats, "features": torch.cat(feats), "logits": torch.cat(logits)}
    return out


def test_features_equal_torch_fidelitys_bit_for_bit(ours: dict, theirs_run: tuple) -> None:
    """Our extractor (weights memory-mapped into a module built on the meta device, our PNG reader)
    against torch-fidelity's own pipeline (its constructor, ``ImagesPathDataset``, DataLoader), on the
    same PNGs and He-normal random weights, at the same batch size (64)."""
    _, features = theirs_run
    assert len(features) == 2, "input1 and input2 each extracted once"
    for name, tf_features in zip(("a", "b"), features, strict=True):
        assert torch.equal(ours[name]["features"], tf_features["2048"])
        assert torch.equal(ours[name]["logits"], tf_features["logits_unbiased"])
    assert not torch.equal(features[0]["2048"][0], features[0]["2048"][1]), "not a degenerate extractor"


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_fid_matches_torch_fidelity(ours: dict, theirs: dict) -> None:
    fid = frechet_distance(*ours["a"]["stats"].mean_cov(), *ours["b"]["stats"].mean_cov())
    assert fid > 0.1, "a degenerate extractor gives FID ≈ 0 for any two sets"
    assert rel_diff(fid, theirs["frechet_inception_distance"]) < REL


def test_kid_matches_torch_fidelity(ours: dict, theirs: dict) -> None:
    mean, std = kernel_inception_distance(
        ours["a"]["features"], ours["b"]["features"], subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE
    )
    assert mean > 10 * std > 0
    assert rel_diff(mean, theirs["kernel_inception_distance_mean"]) < REL
    assert rel_diff(std, theirs["kernel_inception_distance_std"]) < REL


def test_isc_matches_torch_fidelity(ours: dict, theirs: dict) -> None:
    """Random fc weights give IS barely above 1, so IS − 1 is what is compared."""
    mean, std = inception_score(ours["a"]["logits"], splits=ISC_SPLITS)
    assert mean - 1 > 1e-4
    assert rel_diff(mean - 1, theirs["inception_score_mean"] - 1) < REL
    assert rel_diff(std, theirs["inception_score_std"]) < REL


@pytest.mark.parametrize("kernel", [{}, {"degree": 2, "gamma": 0.01, "coef0": 0.5}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kid_settings_match_torch_fidelity(kernel: dict, dtype: torch.dtype) -> None:
    """Non-default kernels, unequal set sizes, both dtypes, a non-default seed: bit for bit."""
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(90, 32, generator=g) * 0.3).to(dtype)
    b = (torch.rand(70, 32, generator=g) * 0.3 + 0.01).to(dtype)
    ours = kernel_inception_distance(a, b, subsets=7, subset_size=50, seed=5, **kernel)
    theirs = kid_features_to_metric(
        a,
        b,
        kid_subsets=7,
        kid_subset_size=50,
        rng_seed=5,
        verbose=False,
        **{f"kid_kernel_poly_{k}": v for k, v in kernel.items()},
    )
    assert ours == (theirs["kernel_inception_distance_mean"], theirs["kernel_inception_distance_std"])


@pytest.mark.parametrize("shuffle", [True, False])
def test_isc_settings_match_torch_fidelity(shuffle: bool) -> None:
    logits = 3 * torch.randn(103, 50, generator=torch.Generator().manual_seed(1))
    theirs = isc_features_to_metric(logits, splits=5, shuffle=shuffle, rng_seed=7)
    mean, std = inception_score(logits, splits=5, shuffle=shuffle, seed=7)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9)


def test_kid_rejects_subsets_larger_than_a_set() -> None:
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(torch.zeros(10, 4), torch.zeros(20, 4), subset_size=11)


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$TORCH_HOME`` = an empty folder; torch.hub's directory follows it (restored afterwards)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path


@pytest.mark.usefixtures("offline")
def test_missing_weights_raise_a_clear_error(empty_torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = (empty_torch_home / "hub" / "checkpoints").resolve()
    with pytest.raises(FileNotFoundError) as err:
        InceptionV3()
    message = str(err.value)
    for needle in (
        WEIGHTS_FILENAME,
        str(folder),
        "callbacks.fid.extractor.weights_path",
        "--inception-weights",
        "python -m diffusionflow.evaluate prefetch",
    ):
        assert needle in message
    elsewhere = empty_torch_home / "elsewhere"
    torch.hub.set_dir(str(elsewhere))  # undone by empty_torch_home's monkeypatch
    with pytest.raises(FileNotFoundError, match=re.escape(str(elsewhere / "checkpoints"))):
        InceptionV3()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InceptionV3(empty_torch_home / "nothing.pth")


@pytest.mark.usefixtures("offline")
def test_weights_found_in_the_hub_cache(empty_torch_home: Path, inception_weights: Path) -> None:
    cached = empty_torch_home / "hub" / "checkpoints" / WEIGHTS_FILENAME
    cached.parent.mkdir(parents=True)
    cached.symlink_to(inception_weights)
    net = InceptionV3()
    assert net.weights_path == cached.parent.resolve() / WEIGHTS_FILENAME
    net.train()
    assert not net.training and not net.net.training
    assert not any(p.requires_grad for p in net.parameters())
    images = torch.randint(
        0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = net(images)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, net(images)), "float32 under autocast"


def test_prefetch_downloads_only_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = []

    def fake_download(url: str, dst: str) -> None:
        urls.append(url)
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = prefetch_inception(tmp_path / "weights")
    assert path == tmp_path / "weights" and path.read_bytes() == b"weights"
    assert urls == [tf_inception.URL_INCEPTION_V3]
    assert prefetch_inception(tmp_path / "weights") == path and len(urls) == 1, "present: no download"
    (tmp_path / "folder").mkdir()
    assert prefetch_inception(tmp_path / "folder") == tmp_path / "folder" / WEIGHTS_FILENAME
    assert len(urls) == 2


def test_to_uint8_rounds_like_edm() -> None:
    x = torch.tensor([-1.0, -1.5, 0.999, 1.0, 2.0, 0.0])
    assert to_uint8(x).tolist() == [0, 0, 255, 255, 255, 128]
    k = torch.arange(256, dtype=torch.float64)
    assert torch.equal(to_uint8(k / 127.5 - 1), k.to(torch.uint8)), "bin centres map to themselves"
    below, above = (k[1:] - 0.5 - 1e-9) / 127.5 - 1, (k[1:] - 0.5 + 1e-9) / 127.5 - 1
    assert torch.equal(to_uint8(below), k[:-1].to(torch.uint8))
    assert torch.equal(to_uint8(above), k[1:].to(torch.uint8))
    assert (to_uint8(above) - to_uint8(below)).eq(1).all(), "not truncation: each x.5 boundary moves by one"
    r = 1.2 * torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    edm = (r * 127.5 + 128).clip(0, 255).to(torch.uint8)
    assert torch.equal(to_uint8(r), edm)
    assert not torch.equal(to_uint8(r), ((r + 1) * 127.5).clip(0, 255).to(torch.uint8))
    r64 = r.double()
    assert np.array_equal(to_uint8(r64).numpy(), (r64 * 127.5 + 128).clip(0, 255).byte().numpy())


def test_a_legacy_weights_file_loads_the_same_weights(inception_weights: Path, tmp_path: Path) -> None:
    """The weights are memory-mapped; a file in torch's pre-1.6 (non-zip) format, which cannot be,
    is read whole: the same tensors, assigned to the same layers."""
    state = torch.load(inception_weights, weights_only=True)
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    mapped, read = InceptionV3(inception_weights).net.state_dict(), InceptionV3(legacy).net.state_dict()
    assert list(mapped) == list(read) == list(state)
    assert all(torch.equal(mapped[k], read[k]) and torch.equal(read[k], state[k]) for k in state)
