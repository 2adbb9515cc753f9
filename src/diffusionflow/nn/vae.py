"""The image autoencoders of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): diffusers' ``AutoencoderKL``, built from a named architecture and loaded from a
local weights file only, and :class:`LatentCodec`, the normalised map images ⇄ latents.

DiT (Peebles & Xie 2023), SiT (Ma et al. 2024), SD3 (Esser et al. 2024) and EDM2 (Karras et al. 2024) train
on ImageNet-256 as 4×32×32 latents of the Stable Diffusion VAE (``stabilityai/sd-vae-ft-ema``, /8
downsampling). The encoder gives a diagonal Gaussian posterior q(z | x) = N(m(x), s(x)²); the codec keeps its
mean m(x), so encoding is deterministic, and normalises it per channel,

    z = (m(x) − μ) / σ,    x̂ = D(σ·z + μ),

with μ, σ of shape (C,). The SD way (Rombach et al. 2022, §4.3.2; DiT, SiT) is μ = 0, σ = 1/0.18215
(the VAE's ``scaling_factor``); EDM2's way (Karras et al. 2024, App. "latent diffusion") is μ, σ the
per-channel mean and standard deviation of m(x) over the data, scaled so that z has per-channel standard
deviation 0.5 = σ_data, the standard deviation of pixel images in [−1, 1] (:func:`latent_stats`).

diffusers is an optional dependency (``pip install -e ".[latent]"``), imported on first use only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from diffusionflow.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "EDM2_LATENT_STD",
    "NORMALISATIONS",
    "PUBLISHED",
    "VAE_CONFIGS",
    "LatentCodec",
    "PublishedWeights",
    "build_autoencoder",
    "latent_shape",
    "latent_stats",
    "load_autoencoder",
    "resolve_weights",
]

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

_DIGITS_VAE = {  # metrics/digits_vae.py trains it on the 16x16 digits: 1x16x16 -> 4x4x4 (/4), 165k parameters
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
    "scaling_factor": 1.0,  # unused: its latents are normalised per channel (edm2)
    "mid_block_add_attention": False,  # a 4x4 grid: attention adds cost, not quality
}

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd-vae-ft-ema": _SD_VAE,  # stabilityai/sd-vae-ft-ema's config.json (ft-mse: the same architecture)
    "digits": _DIGITS_VAE,
}
"""Config name → diffusers ``AutoencoderKL`` constructor arguments."""

NORMALISATIONS = ("edm2", "sd")
EDM2_LATENT_STD = 0.5
"""EDM2's per-channel standard deviation of the normalised latents (σ_data)."""

DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
INSTALL = 'pip install -e ".[latent]"'
PREFETCH = "python -m diffusionflow.evaluate prefetch --what"
# diffusers' attention names before 0.14 (the layout of the sd-vae-ft-* files) → today's
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


@dataclass(frozen=True)
class PublishedWeights:
    """A released weights file: its Hugging Face hub id, the file in that repository, the name it is
    kept under in torch.hub's cache and the ``prefetch --what`` key that downloads it."""

    hub_id: str
    filename: str
    prefetch_key: str

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.hub_id}/resolve/main/{DIFFUSERS_FILES[0]}"

    def default_path(self) -> Path:
        """``torch.hub.get_dir()/checkpoints/<filename>`` (``$TORCH_HOME/hub``), where prefetch puts it."""
        return Path(torch.hub.get_dir()).resolve() / "checkpoints" / self.filename


PUBLISHED = {
    "sd-vae-ft-ema": PublishedWeights("stabilityai/sd-vae-ft-ema", "sd-vae-ft-ema.safetensors", "sd-vae")
}
"""Config name → its released weights (configs without an entry need an explicit weights path)."""


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"the VAE needs diffusers, an optional dependency: {INSTALL}") from err
    return diffusers


def _check_config(config: str) -> dict[str, Any]:
    if config not in VAE_CONFIGS:
        raise ConfigError(f"vae config {config!r} is not known; allowed: {sorted(VAE_CONFIGS)}")
    return VAE_CONFIGS[config]


def build_autoencoder(config: str) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` of the architecture ``VAE_CONFIGS[config]``."""
    kwargs = _check_config(config)
    return _diffusers().AutoencoderKL(**kwargs)


def resolve_weights(config: str, weights_path: str | Path | None) -> Path:
    """The weights file of ``config``: ``weights_path`` (a file, or a diffusers folder holding
    ``diffusion_pytorch_model.safetensors`` or ``.bin``), else the torch.hub cache entry of its released
    weights. A missing file is a FileNotFoundError naming it and the command that fetches it."""
    _check_config(config)
    published = PUBLISHED.get(config)
    fetch = (
        f"`{PREFETCH} {published.prefetch_key}` downloads {published.hub_id} on a machine with internet"
        if published
        else f"vae config {config!r} has no released weights: give the file you trained"
    )
    if weights_path is None:
        if published is None:
            raise ConfigError(f"vae config {config!r} needs weights_path (it has no released weights)")
        path = published.default_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"VAE weights {path} not found (they are never downloaded implicitly): {fetch}, or give "
                "weights_path / --vae-weights"
            )
        return path
    path = Path(weights_path).expanduser()
    if path.is_dir():
        found = [path / name for name in DIFFUSERS_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"VAE weights folder {path} holds none of {list(DIFFUSERS_FILES)} (the diffusers "
                f"layout); {fetch}"
            )
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"VAE weights file {path} does not exist; {fetch}")
    return path


def _check_folder_config(config: str, path: Path) -> None:
    """A diffusers ``config.json`` beside the weights must describe the architecture of ``config``."""
    file = path.parent / "config.json"
    if not file.is_file():
        return
    found = json.loads(file.read_text())
    expected = VAE_CONFIGS[config]
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels"):
        if key in found and found[key] != expected[key]:
            raise ConfigError(
                f"{file} has {key}={found[key]}, but vae config {config!r} has {key}={expected[key]}"
            )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file, loaded without pickle."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path} is not a flat state dict of tensors (a CompVis/ldm .ckpt is not supported: use the "
            "diffusers files, diffusion_pytorch_model.safetensors)"
        )
    return dict(state)


def _rename_legacy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Attention weights saved under diffusers' names before 0.14 (query/key/value/proj_attn), as in the
    released sd-vae-ft-* files, under today's names (to_q/to_k/to_v/to_out.0)."""

    def rename(key: str) -> str:
        match = _LEGACY_KEY.match(key)
        return f"{match[1]}.{_LEGACY_ATTENTION[match[2]]}.{match[3]}" if match else key

    return {rename(k): v for k, v in state.items()}


def load_autoencoder(config: str, weights_path: str | Path | None) -> AutoencoderKL:
    """``AutoencoderKL`` of architecture ``config`` with the weights of :func:`resolve_weights`, in eval
    mode with ``requires_grad`` off. Never touches the network. (Built on the meta device and given the
    loaded tensors: no random initialisation, no second copy.)"""
    path = resolve_weights(config, weights_path)
    _check_folder_config(config, path)
    state = _rename_legacy(_read_state_dict(path))
    with torch.device("meta"):
        model = build_autoencoder(config)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} here"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not fit vae config {config!r}: {len(missing)} missing keys {missing[:2]}, "
            f"{len(unexpected)} unexpected {unexpected[:2]}, {len(shapes)} of another shape {shapes[:2]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def latent_shape(config: Mapping[str, Any], image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of the images → (latent channels, H/f, W/f), f = 2^(number of blocks − 1), for the
    ``AutoencoderKL`` arguments ``config`` (a ``VAE_CONFIGS`` entry or a model's ``.config``)."""
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    channels, height, width = (int(s) for s in image_shape)
    if channels != config["in_channels"] or height % factor or width % factor:
        raise ValueError(
            f"image shape {tuple(image_shape)}: the VAE takes {config['in_channels']} channels and sides "
            f"divisible by {factor}"
        )
    return config["latent_channels"], height // factor, width // factor


def latent_stats(
    normalisation: str, data_mean: Sequence[float], data_std: Sequence[float], scaling_factor: float
) -> tuple[list[float], list[float]]:
    """(μ, σ) of z = (m(x) − μ)/σ: ``sd``: μ = 0, σ = 1/scaling_factor; ``edm2``: μ the data mean of m(x)
    per channel, σ its standard deviation / 0.5 (so z has per-channel standard deviation 0.5)."""
    if normalisation not in NORMALISATIONS:
        raise ConfigError(
            f"normalisation={normalisation!r} is not allowed; choose one of {list(NORMALISATIONS)}"
        )
    if normalisation == "sd":
        return [0.0] * len(data_mean), [1.0 / scaling_factor] * len(data_mean)
    return [float(m) for m in data_mean], [float(s) / EDM2_LATENT_STD for s in data_std]


class LatentCodec(nn.Module):
    """Images in [−1, 1] ⇄ normalised latents z = (m(x) − mean)/std, with m(x) the posterior mean."""

    def __init__(self, autoencoder: AutoencoderKL, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        channels = autoencoder.config.latent_channels
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (channels,) or std.shape != (channels,) or not bool((std > 0).all()):
            raise ValueError(
                f"mean and std must have shape ({channels},) (the latent channels), std > 0; got "
                f"{tuple(mean.shape)} and {tuple(std.shape)}"
            )
        self.autoencoder = autoencoder
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @classmethod
    def sd_scale(cls, autoencoder: AutoencoderKL) -> LatentCodec:
        """The SD normalisation: mean 0, std 1/scaling_factor (z = 0.18215·m(x) for the SD VAE)."""
        channels = autoencoder.config.latent_channels
        mean, std = latent_stats("sd", [0.0] * channels, [1.0] * channels, autoencoder.config.scaling_factor)
        return cls(autoencoder, torch.tensor(mean), torch.tensor(std))

    @classmethod
    def from_meta(
        cls, autoencoder: AutoencoderKL, meta: Mapping[str, Any], normalisation: str | None = None
    ) -> LatentCodec:
        """The codec of a latent folder's ``meta.json``: its own normalisation, or ``normalisation``
        computed from its data statistics."""
        if normalisation is None or normalisation == meta["normalisation"]:
            mean, std = meta["mean"], meta["std"]
        else:
            mean, std = latent_stats(
                normalisation, meta["data_mean"], meta["data_std"], autoencoder.config.scaling_factor
            )
        return cls(autoencoder, torch.tensor(mean), torch.tensor(std))

    def _per_channel(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean.view(-1, 1, 1).to(x), self.std.view(-1, 1, 1).to(x)

    def encode(self, images: Tensor) -> Tensor:
        """z = (m(x) − mean)/std for images NCHW in [−1, 1] (deterministic: the posterior mean)."""
        posterior_mean = self.autoencoder.encode(images).latent_dist.mean
        mean, std = self._per_channel(posterior_mean)
        return (posterior_mean - mean) / std

    def decode(self, latents: Tensor) -> Tensor:
        """x̂ = D(std·z + mean), clamped to [−1, 1]."""
        mean, std = self._per_channel(latents)
        return self.autoencoder.decode(latents * std + mean).sample.clamp(-1.0, 1.0)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of the images → the shape of their latents (:func:`latent_shape`)."""
        return latent_shape(self.autoencoder.config, image_shape)

    def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of latents → the shape of the images they decode to (the inverse of ``latent_shape``)."""
        config = self.autoencoder.config
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        channels, height, width = (int(s) for s in latent_shape)
        if channels != config["latent_channels"]:
            raise ValueError(
                f"latent shape {tuple(latent_shape)}: the VAE decodes {config['latent_channels']} channels"
            )
        return config["out_channels"], height * factor, width * factor
