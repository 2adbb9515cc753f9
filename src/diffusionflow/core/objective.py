"""The training objective (Kingma & Gao 2023, Eq. 7; SD3 §3.1):

    L(x) = ½ E_{λ~p, ε}[ w(λ)/p(λ) ‖ε̂ − ε‖² ],

with ‖·‖² the *mean* over data dimensions (so values do not scale with resolution). It is computed
from the network's own regression error, ‖out − target‖² = m(λ) ‖ε̂ − ε‖² (``mse_factor`` of the
prediction), i.e. per sample ½ w/(p m) ‖out − target‖²: the same number, without dividing by α or σ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .predictions import Prediction
from .proposals import Proposal
from .schedules import Schedule
from .weightings import Weighting

__all__ = ["Objective", "ObjectiveOutput"]

Network = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ObjectiveOutput:
    """Per-sample loss (B,), the λ it was drawn at (B,), the ε-MSE (B,) and the network output."""

    loss: Tensor
    logsnr: Tensor
    eps_mse: Tensor
    out: Tensor


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class Objective:
    """½ w(λ)/p(λ) ‖ε̂ − ε‖² for one batch: draws λ ~ p and ε, forms z = α x + σ ε on ``schedule``,
    calls ``net(c_in z, c_noise)`` and compares its output to the prediction's target."""

    def __init__(
        self, schedule: Schedule, prediction: Prediction, weighting: Weighting, proposal: Proposal
    ) -> None:
        self.schedule, self.prediction, self.weighting, self.proposal = (
            schedule,
            prediction,
            weighting,
            proposal,
        )

    def importance_weight(self, logsnr: Tensor) -> Tensor:
        """½ w(λ)/p(λ): the weight of ‖ε̂ − ε‖² in the loss."""
        return 0.5 * self.weighting(logsnr) * torch.exp(-self.proposal.log_prob(logsnr))

    def __call__(
        self,
        net: Network,
        x: Tensor,
        generator: torch.Generator | None = None,
        logsnr: Tensor | None = None,
        eps: Tensor | None = None,
    ) -> ObjectiveOutput:
        """``logsnr`` and ``eps`` may be given (tests, fixed evaluation points); else drawn."""
        if logsnr is None:
            logsnr = self.proposal.sample(x.shape[0], generator, device=x.device).to(x.dtype)
        if eps is None:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        o = self.schedule(self.schedule.t_of_logsnr(logsnr))
        alpha, sigma = _bcast(o.alpha, x), _bcast(o.sigma, x)
        z = alpha * x + sigma * eps
        out = net(self.prediction.c_in(alpha, sigma) * z, self.prediction.c_noise(logsnr))
        target = self.prediction.target(x, eps, alpha, sigma)
        sq = (out - target).pow(2).flatten(1).mean(1)
        factor = self.prediction.mse_factor(alpha, sigma).reshape(-1)
        eps_mse = sq / factor
        return ObjectiveOutput(self.importance_weight(logsnr) * eps_mse, logsnr, eps_mse.detach(), out)
