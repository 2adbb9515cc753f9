"""Pictures of generated samples: a scatter over the true law (2-D data) and an image mosaic."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

__all__ = ["image_mosaic", "mosaic", "scatter_plot"]


def scatter_plot(samples: Tensor, dataset: Any, path: Path) -> None:
    """2-D samples over the law of ``dataset``: its exact log-density for mixtures, else a histogram of
    reference samples."""
    fig, ax = plt.subplots(figsize=(5, 5))
    s = samples.double().numpy()
    lim = float(np.quantile(np.abs(s), 0.995)) * 1.1 + 0.5
    mixture = getattr(dataset, "mixture", None)
    if mixture is not None:
        axis = torch.linspace(-lim, lim, 200, dtype=torch.float64)
        xx, yy = torch.meshgrid(axis, axis, indexing="xy")
        logp = mixture.log_prob_data(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(200, 200)
        ax.contourf(xx.numpy(), yy.numpy(), logp.clamp_min(-12).numpy(), levels=20, cmap="Blues")
    else:
        ref = dataset.reference_samples(20000, seed=12345).double().numpy()
        ax.hist2d(ref[:, 0], ref[:, 1], bins=120, range=[[-lim, lim], [-lim, lim]], cmap="Blues")
    ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:red", alpha=0.5, label="samples")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mosaic(images: Tensor) -> Tensor:
    """uint8 (3, H, W): uint8 images side by side in a square mosaic."""
    from torchvision.utils import make_grid

    return make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=1)


def image_mosaic(samples: Tensor, path: Path) -> None:
    """Images in [-1, 1] saved as one square mosaic."""
    from torchvision.utils import save_image

    save_image((samples.float() + 1) / 2, path, nrow=int(np.ceil(np.sqrt(len(samples)))), padding=1)
