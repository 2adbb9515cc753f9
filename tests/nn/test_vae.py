"""The VAE: the SD architecture loads from local files only, the codec's normalisation and its errors."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusionflow
from diffusionflow import evaluate
from diffusionflow.errors import ConfigError
from diffusionflow.nn import vae
from diffusionflow.nn.vae import (
    LatentCodec,
    build_autoencoder,
    latent_stats,
    load_autoencoder,
    resolve_weights,
)
from vae_helpers import TINY, TINY_VAE, save_tiny_weights

SD = "sd-vae-ft-ema"


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The tiny config registered for this test, and its random weights file."""
    monkeypatch.setitem(vae.VAE_CONFIGS, TINY, TINY_VAE)
    return save_tiny_weights(tmp_path / "tiny.safetensors")


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_sd_architecture_round_trip_from_a_safetensors_file(tmp_path: Path) -> None:
    """A random state dict of the SD VAE saved as safetensors loads (frozen, eval mode); 3×64×64 ⇄
    4×8×8 (the network is fully convolutional, with attention at the lowest resolution: the 256² ⇄ 32²
    of ImageNet-256 runs the same code at 16× the CPU time)."""
    torch.manual_seed(0)
    model = build_autoencoder(SD)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "sd.safetensors"))
    loaded = load_autoencoder(SD, tmp_path / "sd.safetensors")
    assert _states_equal(model, loaded) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    codec = LatentCodec.sd_scale(loaded)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        z = codec.encode(x)
        assert z.shape == (1, *codec.latent_shape((3, 64, 64))) == (1, 4, 8, 8)
        assert codec.decode(z).shape == x.shape
    assert codec.latent_shape((3, 256, 256)) == (4, 32, 32)
    assert codec.image_shape((4, 32, 32)) == (3, 256, 256)


def test_released_attention_names_load(tiny: Path, tmp_path: Path) -> None:
    """The sd-vae-ft-* files keep diffusers' attention names before 0.14 (query, key, value, proj_attn):
    such a file, in a diffusers folder, loads to the same weights."""
    state = load_file(str(tiny))
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(f".{new}.", f".{old}.") if ".attentions." in key else key
        legacy[key] = value
    assert sum(k.endswith(".query.weight") for k in legacy) == 2  # the encoder's and decoder's mid-block
    (tmp_path / "folder").mkdir()
    save_file(legacy, str(tmp_path / "folder" / "diffusion_pytorch_model.safetensors"))
    assert _states_equal(load_autoencoder(TINY, tmp_path / "folder"), load_autoencoder(TINY, tiny))


def test_codec_normalises_the_posterior_mean(tiny: Path) -> None:
    """encode = (posterior mean − mean)/std; decode = D(std·z + mean) clamped; sd_scale = scaling·m."""
    autoencoder = load_autoencoder(TINY, tiny)
    mean, std = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([2.0, 0.5, 1.0, 3.0])
    codec = LatentCodec(autoencoder, mean, std)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        m = autoencoder.encode(x).latent_dist.mean
        z = codec.encode(x)
        torch.testing.assert_close(z, (m - mean.view(-1, 1, 1)) / std.view(-1, 1, 1))
        torch.testing.assert_close(codec.decode(z), autoencoder.decode(m).sample.clamp(-1, 1))
        assert codec.decode(z * 100).abs().max() <= 1
        torch.testing.assert_close(
            LatentCodec.sd_scale(autoencoder).encode(x), m * TINY_VAE["scaling_factor"]
        )
    assert codec.latent_shape((3, 16, 16)) == z.shape[1:] == (4, 8, 8)
    with pytest.raises(ValueError, match="divisible by 2"):
        codec.latent_shape((3, 15, 16))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        LatentCodec(autoencoder, torch.zeros(3), torch.ones(3))


def test_latent_stats_and_codec_from_meta(tiny: Path) -> None:
    """edm2: the data statistics with std doubled (normalised latents have std 0.5); sd: 0 and 1/scaling."""
    data_mean, data_std = [1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 2.0, 4.0]
    assert latent_stats("edm2", data_mean, data_std, 0.18215) == (data_mean, [1.0, 2.0, 4.0, 8.0])
    assert latent_stats("sd", data_mean, data_std, 0.25) == ([0.0] * 4, [4.0] * 4)
    with pytest.raises(ConfigError, match="normalisation='ldm'"):
        latent_stats("ldm", data_mean, data_std, 0.25)
    meta = {"normalisation": "edm2", "mean": data_mean, "std": [1.0, 2.0, 4.0, 8.0]}
    meta |= {"data_mean": data_mean, "data_std": data_std}
    autoencoder = load_autoencoder(TINY, tiny)
    assert LatentCodec.from_meta(autoencoder, meta).std.tolist() == [1.0, 2.0, 4.0, 8.0]
    sd = LatentCodec.from_meta(autoencoder, meta, "sd")
    assert sd.mean.tolist() == [0.0] * 4 and sd.std.tolist() == [2.0] * 4


def test_missing_weights_name_the_file_and_the_prefetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as error:
        load_autoencoder(SD, None)
    message = str(error.value)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "sd-vae-ft-ema.safetensors"
    assert str(expected) in message and "evaluate prefetch --what sd-vae" in message
    assert "stabilityai/sd-vae-ft-ema" in message
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.safetensors")):
        load_autoencoder(SD, tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_autoencoder(SD, tmp_path)
    with pytest.raises(ConfigError, match=r"vae config 'sd-vae' is not known; allowed: \[.*'sd-vae-ft-ema'"):
        load_autoencoder("sd-vae", None)


def test_prefetch_puts_the_sd_vae_where_loading_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``evaluate prefetch --what sd-vae`` downloads the hub file (the download is replaced: no network)
    to the path ``load_autoencoder(..., None)`` reads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    urls = []

    def fake_download(url: str, dst: str) -> None:
        urls.append(url)
        Path(dst).write_bytes(b"w")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    evaluate.main(["prefetch", "--what", "sd-vae"])
    hub = "https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors"
    assert urls == [hub]
    assert Path(capsys.readouterr().out.strip()) == resolve_weights(SD, None)


def test_weights_that_do_not_fit_are_refused(tiny: Path, tmp_path: Path) -> None:
    """Another architecture's file, a torch file that is not a state dict, a diffusers config.json that
    names another architecture."""
    with pytest.raises(ValueError, match=f"{tiny} does not fit vae config 'sd-vae-ft-ema': .* another shape"):
        load_autoencoder(SD, tiny)
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "ldm.ckpt")
    with pytest.raises(ValueError, match="not a flat state dict"):
        load_autoencoder(TINY, tmp_path / "ldm.ckpt")
    folder = tmp_path / "diffusers"
    folder.mkdir()
    save_tiny_weights(folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({**TINY_VAE, "block_out_channels": [8, 32]}))
    with pytest.raises(ConfigError, match=r"block_out_channels=\[8, 32\].*block_out_channels=\[8, 16\]"):
        load_autoencoder(TINY, folder)
    (folder / "config.json").write_text(json.dumps(TINY_VAE))
    torch.save(load_autoencoder(TINY, folder).state_dict(), tmp_path / "tiny.pt")
    assert _states_equal(load_autoencoder(TINY, tmp_path / "tiny.pt"), load_autoencoder(TINY, tiny))


def test_diffusers_is_imported_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    """No module imports diffusers at its top level; without it, building a VAE names the extra."""
    package = Path(diffusionflow.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("diffusers", "safetensors") for n in names), path
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[latent\]"'):
        build_autoencoder(SD)
