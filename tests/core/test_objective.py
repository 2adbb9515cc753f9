"""The objective depends on the schedule only through its endpoints (Kingma & Gao 2023, §3)."""

from __future__ import annotations

import pytest
import torch

from diffusionflow.core import predictions, proposals, schedules, weightings
from diffusionflow.core.objective import Objective
from helpers import make_mixture

VE = schedules.build("edm", logsnr_min=-40.0, logsnr_max=40.0)
WRONG = make_mixture(dim=2, components=2, seed=7)  # a deliberately imperfect denoiser


def net(z_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    """A fixed ε-predictor of (z_in, c_noise) alone: undo c_in, denoise with the wrong mixture."""
    lam = -8 * c_noise
    sigma_t = torch.exp(-lam / 2)[:, None]
    z_tilde = z_in * torch.sqrt(1 + sigma_t**2)  # c_in = 1/√(σ_d² + σ̃²) with σ_d = 1, on z̃
    x_hat = WRONG.x_hat(z_tilde, VE.t_of_logsnr(lam), VE)
    return (z_tilde - x_hat) / sigma_t


def estimate(sched: schedules.Schedule, n: int = 40000, seed: int = 0) -> tuple[float, float]:
    data = make_mixture(dim=2, components=3, seed=0)
    w = weightings.build("edm")
    obj = Objective(sched, predictions.build("eps"), w, proposals.build("uniform_t", schedule=sched))
    g = torch.Generator().manual_seed(seed)
    loss = obj(net, data.sample(n, g), generator=g).loss
    return float(loss.mean()), float(loss.std() / n**0.5)


def test_expected_loss_depends_only_on_the_endpoints(f64):
    ends = {"logsnr_min": -6.0, "logsnr_max": 8.0}
    l_cos, se_cos = estimate(schedules.build("cosine", **ends))
    l_flow, se_flow = estimate(schedules.build("flow", **ends), seed=1)
    l_lin, se_lin = estimate(schedules.build("linear", **ends), seed=2)
    for other, se in ((l_flow, se_flow), (l_lin, se_lin)):
        assert abs(l_cos - other) < 3 * (se_cos**2 + se**2) ** 0.5
    l_short, se_short = estimate(schedules.build("cosine", logsnr_min=-2.0, logsnr_max=8.0), seed=3)
    assert abs(l_cos - l_short) > 5 * (se_cos**2 + se_short**2) ** 0.5


def test_loss_is_half_w_over_p_times_eps_mse(f64):
    """Per sample: ½ w(λ)/p(λ) ‖ε̂ − ε‖² (mean over dimensions), computed here from ε̂ directly."""
    sched = schedules.build("cosine")
    w, pred = weightings.build("sd3"), predictions.build("x")
    prop = proposals.build("log_normal")
    data = make_mixture()
    g = torch.Generator().manual_seed(0)
    x = data.sample(512, g)
    lam, eps = prop.sample(512, g), torch.randn(512, 2, generator=g)
    res = Objective(sched, pred, w, prop)(lambda z, c: torch.sin(z) + c[:, None], x, logsnr=lam, eps=eps)
    o = sched(sched.t_of_logsnr(lam))
    a, s = o.alpha[:, None], o.sigma[:, None]
    _, eps_hat = pred.to_x_eps(res.out, a * x + s * eps, a, s)
    expected = 0.5 * w(lam) / torch.exp(prop.log_prob(lam)) * (eps_hat - eps).pow(2).mean(-1)
    assert torch.allclose(res.loss, expected, rtol=1e-9)
    assert torch.allclose(res.eps_mse, (eps_hat - eps).pow(2).mean(-1), rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_images_and_dtypes(dtype):
    sched = schedules.build("flow")
    obj = Objective(
        sched,
        predictions.build("flow"),
        weightings.build("flow"),
        proposals.build("uniform_t", schedule=sched),
    )
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    res = obj(lambda z, c: z * c[:, None, None, None], x, generator=torch.Generator().manual_seed(0))
    assert res.loss.shape == (4,) and res.loss.dtype == dtype and torch.isfinite(res.loss).all()
