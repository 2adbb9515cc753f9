"""A tiny random ``AutoencoderKL`` for the latent tests: 3×16×16 images → 4×8×8 latents."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusionflow.nn import vae

TINY = "tiny-test"
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 16,
    "scaling_factor": 0.5,
}


def register_tiny() -> None:
    """Adds the tiny config to ``VAE_CONFIGS``, in processes a test spawns (in the test's own process,
    ``monkeypatch.setitem(vae.VAE_CONFIGS, TINY, TINY_VAE)``, so other tests never see it)."""
    vae.VAE_CONFIGS[TINY] = TINY_VAE


def save_tiny_weights(path: Path, seed: int = 0) -> Path:
    """Random weights of the tiny config, saved as a safetensors file at ``path``."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = AutoencoderKL(**TINY_VAE)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
