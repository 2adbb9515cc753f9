"""The Gaussian-mixture oracle: Tweedie, autograd score, Monte-Carlo posterior mean, densities."""

from __future__ import annotations

import math

import pytest
import torch

from diffusionflow.core import schedules
from helpers import make_mixture


@pytest.mark.parametrize("sched_name", ["cosine", "flow", "edm"])
def test_score_is_gradient_of_log_density_and_tweedie_holds(gmm, sched_name):
    sched = schedules.build(sched_name)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    z = gmm.sample_t(5, 0.5, sched, torch.Generator().manual_seed(0))
    zz = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(zz, t, sched).sum(), zz)
    assert torch.allclose(gmm.score(z, t, sched), grad, atol=1e-12)
    o = sched(t)
    a, s = o.alpha[:, None], o.sigma[:, None]
    assert torch.allclose(a * gmm.x_hat(z, t, sched) + s * gmm.eps_hat(z, t, sched), z, atol=1e-12)
    assert torch.allclose(gmm.eps_hat(z, t, sched), -s * grad, atol=1e-12)


def test_x_hat_is_the_posterior_mean_by_monte_carlo(gmm):
    """E[x | z]: self-normalised importance sampling with the prior as proposal."""
    sched = schedules.build("cosine")
    t = torch.tensor(0.6)
    o = sched(t)
    g = torch.Generator().manual_seed(1)
    z = gmm.sample_t(3, t, sched, g)
    xs = gmm.sample(400000, g)
    log_lik = -0.5 * ((z[:, None, :] - o.alpha * xs[None]) ** 2).sum(-1) / o.sigma**2
    w = torch.softmax(log_lik, dim=1)
    mc = w @ xs
    ess = 1 / (w**2).sum(1)
    assert (ess > 1000).all()
    assert torch.allclose(gmm.x_hat(z, t, sched), mc, atol=0.05)


def test_log_density_integrates_to_one_in_1d(f64):
    one_d = make_mixture(dim=1, components=3, seed=2)
    sched = schedules.build("flow")
    z = torch.linspace(-30, 30, 60001)[:, None]
    for t in (0.0, 0.4, 1.0):
        p = torch.exp(one_d.log_prob(z, t, sched))
        assert float(torch.trapezoid(p, z[:, 0])) == pytest.approx(1.0, abs=1e-8)
    assert torch.allclose(one_d.log_prob(z[::1000], 0.0, sched), one_d.log_prob_data(z[::1000]))
    at_noise = one_d.log_prob(z[::1000], 1.0, sched)
    assert torch.allclose(at_noise, -0.5 * z[::1000, 0] ** 2 - 0.5 * math.log(2 * math.pi))


def test_samples_have_the_mixture_moments(gmm):
    x = gmm.sample(200000, torch.Generator().manual_seed(3))
    assert torch.allclose(x.mean(0), gmm.mean(), atol=0.03)
    assert torch.allclose(torch.cov(x.T), gmm.covariance(), atol=0.05)


def test_bad_shapes():
    with pytest.raises(ValueError, match="covariances has shape"):
        from diffusionflow.core.oracle import GaussianMixture

        GaussianMixture(torch.zeros(2, 3), torch.eye(3).expand(3, 3, 3))
