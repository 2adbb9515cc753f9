"""Adapters to peer conventions, and our Heun against EDM's Algorithm 1 written in σ."""

from __future__ import annotations

import torch

from diffusionflow.core import adapters, samplers, schedules


def test_sigma_denoiser_round_trip(gmm):
    sched = schedules.build("cosine")
    den = lambda z, t: gmm.x_hat(z, t, sched)  # noqa: E731
    model = adapters.to_sigma_denoiser(den, sched)
    back = adapters.from_sigma_denoiser(model, sched)
    z = gmm.sample_t(8, 0.4, sched, torch.Generator().manual_seed(0))
    t = torch.tensor(0.4)
    assert torch.allclose(back(z, t), den(z, t), atol=1e-12)
    # The σ-denoiser is the VE-form oracle: E[x | x + σ̃ n].
    ve = schedules.build("edm", logsnr_min=-30.0, logsnr_max=30.0)
    sig = torch.tensor(1.7)
    xt = gmm.sample_t(8, ve.t_of_logsnr(-2 * torch.log(sig)), ve, torch.Generator().manual_seed(1))
    assert torch.allclose(model(xt, sig), gmm.x_hat(xt, ve.t_of_logsnr(-2 * torch.log(sig)), ve), atol=1e-12)


def test_velocity_round_trip_and_condot_convention(gmm):
    """torchcfm/flow_matching CondOT: x_s = s x1 + (1 − s) x0, x0 noise, v = x1 − x0 = x − ε."""
    sched = schedules.build("flow")
    den = lambda z, t: gmm.x_hat(z, t, sched)  # noqa: E731
    velocity = adapters.to_velocity(den, sched)
    g = torch.Generator().manual_seed(2)
    x1, x0 = gmm.sample(8, g), torch.randn(8, 2, generator=g)
    s = torch.tensor(0.35)
    xs = s * x1 + (1 - s) * x0
    t = 1 - s
    x_hat = den(xs, t)
    eps_hat = (xs - (1 - t) * x_hat) / t
    assert torch.allclose(velocity(xs, s), x_hat - eps_hat, atol=1e-12)
    back = adapters.from_velocity(velocity, sched)
    assert torch.allclose(back(xs, t), x_hat, atol=1e-12)
    vp = schedules.build("cosine")
    den_vp = lambda z, t: gmm.x_hat(z, t, vp)  # noqa: E731
    z = gmm.sample_t(8, 0.3, vp, g)
    round_trip = adapters.from_velocity(adapters.to_velocity(den_vp, vp), vp)
    assert torch.allclose(round_trip(z, torch.tensor(0.3)), den_vp(z, torch.tensor(0.3)), atol=1e-12)


def edm_algorithm_1(model, latents, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Karras et al. 2022, Algorithm 1, transcribed from the paper in σ (a peer implementation)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    sig = (
        sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    sig = torch.cat([sig, torch.zeros(1)])
    x = latents * sig[0]
    for k in range(num_steps):
        d = (x - model(x, sig[k])) / sig[k]
        x_next = x + (sig[k + 1] - sig[k]) * d
        if k < num_steps - 1:
            d2 = (x_next - model(x_next, sig[k + 1])) / sig[k + 1]
            x_next = x + (sig[k + 1] - sig[k]) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def test_our_heun_drives_a_peer_sigma_denoiser_like_edm(gmm):
    """Our Heun on the EDM grid, with any schedule, equals EDM's Algorithm 1 on the σ-denoiser."""
    ve = schedules.build("edm")
    model = adapters.to_sigma_denoiser(lambda z, t: gmm.x_hat(z, t, ve), ve)
    latents = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    peer = edm_algorithm_1(model, latents)
    for sched in (ve, schedules.build("cosine"), schedules.build("flow", scale="vp")):
        heun = samplers.build("heun", steps=18, grid="edm")
        ours = heun(adapters.from_sigma_denoiser(model, sched), latents, sched)
        # On VP schedules σ(t_0) = 80/√(1 + 80²): z̃_0 = 80 ε exactly as EDM's x_0.
        assert torch.allclose(ours, peer, atol=1e-10), sched
        assert heun.nfe == 35
