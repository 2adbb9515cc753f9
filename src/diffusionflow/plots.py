"""Figures shared by the commands: a run's weighting (``train``) and a sweep's weightings (``compare``).

Drawn on a ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend): safe to import from any
command, and from a headless job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from diffusionflow.core.proposals import Proposal
from diffusionflow.core.weightings import Weighting

__all__ = ["plot_weightings"]


def plot_weightings(
    entries: Sequence[tuple[str, Weighting, Proposal]],
    path: Path,
    logsnr_range: tuple[float, float] = (-12, 12),
) -> None:
    """w(λ)/max w and p(λ) for each (label, weighting, proposal): the blog's figure for these runs."""
    lam = torch.linspace(*logsnr_range, 481, dtype=torch.float64)
    fig = Figure(figsize=(11, 4))
    aw, ap = fig.subplots(1, 2)
    for label, w, p in entries:
        wl = w(lam)
        aw.plot(lam, wl / wl.max(), label=label)
        ap.plot(lam, p.log_prob(lam).exp(), label=f"{label}: {type(p).__name__}")
    aw.set_title("weighting w(λ) (normalised to max 1)", fontsize=9)
    ap.set_title("proposal p(λ) used in training", fontsize=9)
    for ax in (aw, ap):
        ax.set_xlabel("log-SNR λ")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
