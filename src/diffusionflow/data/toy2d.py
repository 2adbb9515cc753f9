"""2-D toy data: Gaussian mixtures with exact densities, and the usual non-Gaussian shapes.

Every law is centred and scaled so that its *average per-coordinate variance* is about 1
(tr Cov / 2 ≈ 1), the scale the model and sampler defaults assume:

* Gaussian mixtures (``MIXTURES``) are standardised exactly: the raw parameters below are shifted by
  the mixture mean and divided by √(tr Cov / 2), so ``mixture(name).mean() = 0`` and
  ``tr mixture(name).covariance() = 2``. Their :class:`~diffusionflow.core.oracle.GaussianMixture`
  gives exact samples, densities, denoisers and scores for tests, figures and metrics.

  - ``blog``: four components with different spreads, in the spirit of the 2-D mixture figures of
    the blog "Diffusion Meets Flow Matching" (Gao et al. 2024); the parameters are ours: means
    (−2, 1.5), (2, 1), (0.5, −2), (2.5, −1.5), standard deviations 0.5, 0.2, a tilted ellipse
    [[0.36, 0.2], [0.2, 0.16]] and 0.1, weights 0.35, 0.2, 0.3, 0.15.
  - ``eight``: 8 equal Gaussians on a circle, radius 4, std 0.5 (FFJORD's "8gaussians", Grathwohl
    et al. 2019), i.e. radius 1.39 and std 0.17 after scaling.
  - ``grid``: 25 equal Gaussians on the grid {−4, −2, 0, 2, 4}², std 0.05 (the mode-collapse
    benchmark of VEEGAN, Srivastava et al. 2017), i.e. spacing 0.71 and std 0.018 after scaling.

* Shapes without a density (``mixture`` is None):

  - ``moons``: scikit-learn's ``make_moons(noise=0.05)``, shifted by its centre (0.5, 0.25) and
    scaled by √2 (variances ≈ 1.50 and 0.49). make_moons places the angles on an even grid and adds
    Gaussian noise, so a set is stratified rather than i.i.d.; another seed changes noise and order.
  - ``rings``: 4 concentric circles of radius 0.5, 1, 1.5, 2 chosen with equal probability, uniform
    angle, radial noise std 0.05 (variance ≈ 0.94 per coordinate).
  - ``checkerboard``: uniform on the 8 black cells of a 4×4 board covering [−√3, √3]², so each
    coordinate is uniform on [−√3, √3] with variance exactly 1 (FFJORD's checkerboard, rescaled).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from sklearn.datasets import make_moons
from torch import Tensor

from diffusionflow.core.oracle import GaussianMixture

from .transforms import TensorPairs, check_choice

__all__ = ["MIXTURES", "NAMES", "Toy2D", "mixture", "sample"]

_F64 = torch.float64
MOONS_NOISE = 0.05
RING_RADII = (0.5, 1.0, 1.5, 2.0)
RING_NOISE = 0.05


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _standardised(means: Tensor, covariances: Tensor, weights: Tensor) -> GaussianMixture:
    """The mixture shifted to mean 0 and scaled to tr Cov = D."""
    raw = GaussianMixture(means.to(_F64), covariances.to(_F64), weights.to(_F64))
    scale = (raw.covariance().trace() / raw.dim).rsqrt()
    return GaussianMixture((raw.means - raw.mean()) * scale, raw.covariances * scale**2, raw.weights)


def _isotropic(means: Tensor, std: float) -> GaussianMixture:
    covariances = std**2 * torch.eye(2, dtype=_F64).expand(len(means), 2, 2)
    return _standardised(means, covariances, torch.ones(len(means), dtype=_F64))


def _blog() -> GaussianMixture:
    means = torch.tensor([[-2.0, 1.5], [2.0, 1.0], [0.5, -2.0], [2.5, -1.5]])
    covariances = torch.tensor(
        [
            [[0.25, 0.0], [0.0, 0.25]],
            [[0.04, 0.0], [0.0, 0.04]],
            [[0.36, 0.2], [0.2, 0.16]],
            [[0.01, 0.0], [0.0, 0.01]],
        ]
    )
    return _standardised(means, covariances, torch.tensor([0.35, 0.2, 0.3, 0.15]))


def _eight() -> GaussianMixture:
    angle = torch.arange(8, dtype=_F64) * (2 * math.pi / 8)
    return _isotropic(4.0 * torch.stack([angle.cos(), angle.sin()], dim=-1), std=0.5)


def _grid() -> GaussianMixture:
    ticks = torch.arange(-4.0, 5.0, 2.0, dtype=_F64)
    return _isotropic(torch.cartesian_prod(ticks, ticks), std=0.05)


def _moons(n: int, seed: int) -> Tensor:
    points, _ = make_moons(n_samples=n, noise=MOONS_NOISE, random_state=seed)
    return (torch.from_numpy(points) - torch.tensor([0.5, 0.25], dtype=_F64)) * math.sqrt(2)


def _rings(n: int, seed: int) -> Tensor:
    g = _generator(seed)
    radius = torch.tensor(RING_RADII, dtype=_F64)[torch.randint(len(RING_RADII), (n,), generator=g)]
    radius = radius + RING_NOISE * torch.randn(n, generator=g, dtype=_F64)
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=_F64)
    return radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=-1)


def _checkerboard(n: int, seed: int) -> Tensor:
    g = _generator(seed)
    column = torch.randint(4, (n,), generator=g)
    row = 2 * torch.randint(2, (n,), generator=g) + column % 2  # same parity: a black cell
    cell = torch.stack([column, row], dim=-1) + torch.rand(n, 2, generator=g, dtype=_F64)
    return (cell / 2 - 1) * math.sqrt(3)  # [0, 4]² → [−√3, √3]²


MIXTURES: dict[str, Callable[[], GaussianMixture]] = {"blog": _blog, "eight": _eight, "grid": _grid}
_SHAPES: dict[str, Callable[[int, int], Tensor]] = {
    "moons": _moons,
    "rings": _rings,
    "checkerboard": _checkerboard,
}
NAMES: tuple[str, ...] = (*MIXTURES, *_SHAPES)


def mixture(name: str) -> GaussianMixture:
    """The standardised float64 Gaussian mixture called ``name`` (one of ``MIXTURES``)."""
    check_choice("name", name, tuple(MIXTURES))
    return MIXTURES[name]()


def sample(name: str, n: int, seed: int) -> Tensor:
    """n points (n, 2) float64 of the toy law ``name``, deterministic given ``seed``."""
    check_choice("name", name, NAMES)
    if name in MIXTURES:
        return mixture(name).sample(n, _generator(seed))
    return _SHAPES[name](n, seed)


class Toy2D(TensorPairs):
    """A fixed set of ``n`` float32 points (2,) of the toy law ``name`` drawn with ``seed``; labels 0.

    ``mixture`` is the law's GaussianMixture (None for moons, rings, checkerboard);
    ``reference_samples(n, seed)`` draws fresh points of the same law for metrics.
    """

    def __init__(self, name: str = "blog", n: int = 65536, seed: int = 0) -> None:
        check_choice("name", name, NAMES)
        self.name = name
        self.seed = seed
        self.mixture = mixture(name) if name in MIXTURES else None
        super().__init__(self.reference_samples(n, seed), torch.zeros(n, dtype=torch.int64), num_classes=0)

    def reference_samples(self, n: int, seed: int) -> Tensor:
        """n points (n, 2) float32 of the same law; with the dataset's own seed they repeat its data."""
        return sample(self.name, n, seed).to(torch.float32)
