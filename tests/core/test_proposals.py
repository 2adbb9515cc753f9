"""Proposals p(λ): normalised densities, samples that follow them, and the SD3 / EDM forms."""

from __future__ import annotations

import math

import pytest
import torch

from diffusionflow.core import proposals, schedules, weightings
from diffusionflow.core.components import component

GRID = torch.linspace(-40, 40, 200001, dtype=torch.float64)

CASES = [
    ("uniform_t", {"schedule": "cosine"}),
    ("uniform_t", {"schedule": "flow", "logsnr_min": -8.0, "logsnr_max": 6.0}),
    ("uniform_t", {"schedule": "linear"}),
    ("logit_normal", {"m": 0.5, "s": 0.6}),
    ("log_normal", {}),
    ("uniform_logsnr", {"logsnr_min": -5.0, "logsnr_max": 7.0}),
    ("cosmap", {}),
    ("mode", {"s": 1.29}),
    ("mode", {"s": -0.5}),
    ("weighting", {"logsnr_min": -12.0, "logsnr_max": 12.0, "bins": 300}),
    ("adaptive", {"logsnr_min": -12.0, "logsnr_max": 12.0, "bins": 50}),
]


def _build(name, opts):
    return component("proposal", name, {"weighting": weightings.build("edm")}, **opts)


@pytest.mark.parametrize(("name", "opts"), CASES)
def test_density_integrates_to_one(f64, name, opts):
    p = torch.exp(_build(name, opts).log_prob(GRID))
    assert float(torch.trapezoid(p, GRID)) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize(("name", "opts"), CASES)
@pytest.mark.parametrize("stratified", [False, True])
def test_samples_follow_the_density(f64, name, opts, stratified):
    """Kolmogorov–Smirnov distance between samples and the CDF of exp(log_prob), n = 20000."""
    prop = _build(name, {**opts, "stratified": stratified})
    lam = prop.sample(20000, torch.Generator().manual_seed(1)).sort().values
    cdf = torch.cumulative_trapezoid(torch.exp(prop.log_prob(GRID)), GRID)
    cdf = torch.cat([torch.zeros(1), cdf]) / cdf[-1]
    idx = torch.searchsorted(GRID, lam).clamp(0, len(GRID) - 1)
    ecdf = torch.arange(1, len(lam) + 1) / len(lam)
    ks = float((cdf[idx] - ecdf).abs().max())
    assert ks < 1.63 / math.sqrt(len(lam)), ks  # 1% critical value


def test_logit_normal_is_sd3_in_t(f64):
    """π_ln(t; m, s) = 1/(s√2π) · 1/(t(1−t)) · exp(−(logit t − m)²/(2s²)) (SD3 Eq. 19), mapped to λ."""
    m, s = 0.5, 0.6
    t = torch.linspace(0.01, 0.99, 99)
    lam = 2 * torch.log((1 - t) / t)
    pi_t = torch.exp(-((torch.logit(t) - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))
    expected = pi_t * t * (1 - t) / 2
    assert torch.allclose(torch.exp(proposals.build("logit_normal", m=m, s=s).log_prob(lam)), expected)


def test_cosmap_is_uniform_t_under_cosine(f64):
    """SD3's π_CosMap(t) = 2/(π − 2πt + 2πt²) on flow time equals uniform t on the cosine schedule."""
    lam = torch.linspace(-15, 15, 301)
    cosmap = proposals.build("cosmap").log_prob(lam)
    assert torch.allclose(cosmap, proposals.build("uniform_t", schedule="cosine").log_prob(lam), atol=1e-12)
    t = torch.sigmoid(-lam / 2)
    sd3 = 2 / (math.pi * (1 - 2 * t + 2 * t**2)) * t * (1 - t) / 2
    assert torch.allclose(torch.exp(cosmap), sd3, rtol=1e-12)


def test_mode_is_sd3_in_t(f64):
    """t = f_mode(u), u ~ U(0,1): the density in t is 1/|f'(u)| at u = f⁻¹(t)."""
    s = 1.29
    u = torch.linspace(0.01, 0.99, 99)
    t = 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    density_t = 1 / (1 + s * (1 - math.pi / 2 * torch.sin(math.pi * u)))
    lam = 2 * torch.log((1 - t) / t)
    expected = density_t * t * (1 - t) / 2
    assert torch.allclose(torch.exp(proposals.build("mode", s=s).log_prob(lam)), expected, rtol=1e-9)


def test_log_normal_is_edm(f64):
    """ln σ ~ N(P_mean, P_std²): the density of λ = −2 ln σ."""
    lam = torch.linspace(-10, 10, 41)
    sigma = torch.exp(-lam / 2)
    p_ln_sigma = torch.exp(-((torch.log(sigma) + 1.2) ** 2) / (2 * 1.2**2)) / (1.2 * math.sqrt(2 * math.pi))
    assert torch.allclose(torch.exp(proposals.build("log_normal").log_prob(lam)), p_ln_sigma / 2)


def test_uniform_t_density_is_inverse_dlogsnr(f64):
    s = schedules.build("linear")
    t = torch.linspace(0.05, 0.95, 19)
    assert torch.allclose(
        proposals.build("uniform_t", schedule=s).log_prob(s.logsnr(t)), -torch.log(-s.dlogsnr_dt(t))
    )


def test_weighting_proposal_is_proportional_to_w(f64):
    w = weightings.build("sd3")
    p = proposals.build("weighting", weighting=w, logsnr_min=-10, logsnr_max=10, bins=2000)
    lam = torch.linspace(-9.9, 9.9, 500)
    ratio = w(lam) / torch.exp(p.log_prob(lam))
    assert float(ratio.std() / ratio.mean()) < 0.01


def test_adaptive_moves_mass_where_the_loss_is(f64):
    w = weightings.build("sigmoid")
    p = proposals.build("adaptive", weighting=w, logsnr_min=-10, logsnr_max=10, bins=20, decay=0.5)
    before = p.masses.clone()
    lam = torch.linspace(-9.5, 9.5, 20)
    mse = torch.where(lam > 0, 10.0, 1.0)  # large errors at high λ
    p.update(*p.bin_statistics(lam, mse))
    assert (p.masses[10:] / before[10:]).min() > (p.masses[:10] / before[:10]).max()
    expected = w(p.centres) * p.loss_ema
    assert torch.allclose(p.masses, expected / expected.sum())
    state = p.state_dict()
    q = proposals.build("adaptive", weighting=w, logsnr_min=-10, logsnr_max=10, bins=20)
    q.load_state_dict(state)
    assert torch.equal(q.masses, p.masses)


def test_canonical_and_errors():
    edm = weightings.build("edm", P_mean=-1.0, P_std=1.5)
    p = component("proposal", "canonical", {"weighting": edm})
    assert isinstance(p, proposals.LogNormal) and (p.mean, p.std) == (2.0, 3.0)
    with pytest.raises(ValueError, match="proposal='bogus' is unknown; allowed"):
        proposals.build("bogus")
    with pytest.raises(ValueError, match="proposal=canonical needs the run's weighting"):
        component("proposal", "canonical")
    with pytest.raises(TypeError, match="weighting"):  # p ∝ w without a w
        component("proposal", "weighting")
    with pytest.raises(ValueError, match="s=3.0 must be in"):
        proposals.build("mode", s=3.0)
    with pytest.raises(ValueError, match="logsnr_min=5.0 must be < logsnr_max=1.0"):
        proposals.build("uniform_logsnr", logsnr_min=5.0, logsnr_max=1.0)
