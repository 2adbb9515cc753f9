"""Weightings: closed forms, and with the canonical proposal and prediction the objective equals
each paper's plain loss per sample."""

from __future__ import annotations

import math

import pytest
import torch

from diffusionflow.core import predictions, schedules, weightings
from diffusionflow.core.components import component
from diffusionflow.core.objective import Objective

LAM = torch.linspace(-10, 10, 401, dtype=torch.float64)


def gauss(x, m, s):
    return torch.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))


CLOSED_FORMS = {
    "elbo": lambda l: torch.ones_like(l),
    "iddpm": lambda l: 1 / torch.cosh(l / 2) / math.pi,
    "edm": lambda l: 2 * gauss(l, 2.4, 2.4) * (torch.exp(-l) + 0.25) / 0.25,
    "sd3": lambda l: 2 * gauss(l, 0.0, 2.0) * (1 + torch.exp(-l / 2)) ** 2,
    "flow": lambda l: torch.exp(-l / 2),
    "cosine_v": lambda l: 2 / math.pi * torch.exp(-l / 2),
    "sigmoid": lambda l: 1 / (1 + torch.exp(l)),
    "min_snr": lambda l: (
        1 / torch.cosh(l / 2) / math.pi * torch.minimum(torch.ones_like(l), 5 * torch.exp(-l))
    ),
}


@pytest.mark.parametrize("name", sorted(weightings.WEIGHTINGS))
def test_closed_form(f64, name):
    assert torch.allclose(weightings.build(name)(LAM), CLOSED_FORMS[name](LAM), rtol=1e-12)


def test_blog_figure_values_at_lambda_10(f64):
    """math.md §1.4: the blog figure's traces normalised to max 1 on [−10, 10], at λ = 10."""
    lam = torch.linspace(-10, 10, 1000, dtype=torch.float64)
    expected = {"flow": 4.539993e-5, "edm": 1.0190646e-3, "sd3": 3.8224852e-7, "sigmoid": 4.539993e-5}
    for name, value in expected.items():
        w = weightings.build(name)(lam)
        assert float(w[-1] / w.max()) == pytest.approx(value, rel=1e-6), name


def test_flow_and_cosine_v_share_w_up_to_a_constant(f64):
    ratio = weightings.build("cosine_v")(LAM) / weightings.build("flow")(LAM)
    assert torch.allclose(ratio, torch.full_like(ratio, 2 / math.pi), rtol=1e-14)


def _paper_setup(name: str):
    """Each paper's schedule, and its plain per-sample loss from (raw output, x, ε, λ, α, σ, t)."""
    sd = 0.5

    def mse(a, b):
        return (a - b).pow(2).mean(-1)

    def edm_plain(out, x, eps, lam, alpha, sigma, t):
        c_skip = sd**2 / (sigma**2 + sd**2)  # α = 1 on EDM's schedule: σ̃ = σ, z̃ = z
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        return mse(out, (x - c_skip * (x + sigma * eps)) / c_out)

    cosine = schedules.build("cosine")
    table = {
        "edm": (schedules.build("edm", logsnr_min=-40.0, logsnr_max=40.0), edm_plain),
        "sd3": (schedules.build("flow"), lambda out, x, eps, *_: mse(out, eps - x)),
        "flow": (schedules.build("flow"), lambda out, x, eps, *_: mse(out, eps - x)),
        "cosine_v": (cosine, lambda out, x, eps, lam, a, s, t: mse(out, a * eps - s * x)),
        "iddpm": (cosine, lambda out, x, eps, *_: mse(out, eps)),
        "min_snr": (
            cosine,
            lambda out, x, eps, lam, *_: torch.clamp(5 * torch.exp(-lam[:, 0]), max=1) * mse(out, eps),
        ),
        # VDM's fixed schedule: λ_t = λ_max − t (λ_max − λ_min) on [−15, 15], so −λ'_t = 30
        "elbo": (cosine, lambda out, x, eps, *_: -0.5 * -30.0 * mse(out, eps)),
    }
    return table[name]


@pytest.mark.parametrize("name", ["edm", "sd3", "flow", "cosine_v", "iddpm", "min_snr", "elbo"])
def test_canonical_setup_equals_the_papers_plain_loss(f64, name):
    w = weightings.build(name)
    c = w.canonical()
    sched, plain = _paper_setup(name)
    pred = component("prediction", "canonical", {"weighting": w})
    assert (pred.name, type(pred)) == (c.prediction, predictions.PREDICTIONS[c.prediction])
    prop = component("proposal", "canonical", {"weighting": w})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    weight = torch.randn(6, 6, generator=g)

    def net(z_in, c_noise):  # any fixed function of the inputs
        return torch.tanh(z_in @ weight) + c_noise[:, None]

    lam = prop.sample(256, g)
    eps = torch.randn(256, 6, generator=g)
    res = Objective(sched, pred, w, prop)(net, x, logsnr=lam, eps=eps)
    t = sched.t_of_logsnr(lam[:, None])
    o = sched(t)
    expected = plain(res.out, x, eps, lam[:, None], o.alpha, o.sigma, t)
    assert torch.allclose(res.loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "prediction", "proposal"),
    [
        ("edm", "edm", "log_normal"),
        ("sd3", "flow", "logit_normal"),
        ("flow", "flow", "uniform_t"),
        ("cosine_v", "v", "uniform_t"),
        ("sigmoid", "eps", "adaptive"),
    ],
)
def test_canonical_names(name, prediction, proposal):
    c = weightings.build(name).canonical()
    assert (c.prediction, c.proposal) == (prediction, proposal)


def test_bad_options():
    with pytest.raises(ValueError, match="weighting='foo' is unknown; allowed: \\['cosine_v', 'edm'"):
        weightings.build("foo")
    with pytest.raises(ValueError, match="P_std=-1"):
        weightings.build("edm", P_std=-1)
    with pytest.raises(ValueError, match="gamma=0"):
        weightings.build("min_snr", gamma=0)
