"""Feature extractors for image metrics: torch-fidelity's Inception-v3, with offline-safe weights.

:class:`InceptionV3` wraps torch-fidelity's ``FeatureExtractorInceptionV3`` (``inception-v3-compat``:
the TF 2015-12-05 graph ported to PyTorch, with its TF1-compatible bilinear resize to 299 × 299 and
its ``(x − 128)/128`` input scaling), so FID (Heusel et al. 2017), KID (Bińkowski et al. 2018) and IS
(Salimans et al. 2016) computed from its features are torch-fidelity's numbers. It takes uint8
NCHW images, as torch-fidelity does: resizing and normalisation happen inside, never here.

The weights are never downloaded implicitly (torch-fidelity would call
``torch.hub.load_state_dict_from_url``, which hangs or fails on machines without internet): the file is
the explicit ``weights_path`` or the torch.hub cache entry (``$TORCH_HOME/hub/checkpoints/``), and
:func:`prefetch_inception` is the only function that touches the network.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from unittest import mock

import torch
from torch import Tensor, nn

__all__ = [
    "WEIGHTS_FILENAME",
    "FeatureExtractor",
    "InceptionV3",
    "default_weights_path",
    "prefetch_inception",
    "save_random_inception_weights",
    "to_uint8",
]

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
PREFETCH_COMMAND = "python -m diffusionflow.evaluate prefetch"


def _tf_inception() -> ModuleType:
    """torch-fidelity's Inception module, imported on first use (torch-fidelity imports torchvision
    and takes seconds, which code that only needs :class:`FrechetStats` should not pay)."""
    import torch_fidelity.feature_extractor_inceptionv3

    return torch_fidelity.feature_extractor_inceptionv3


class FeatureExtractor(nn.Module):
    """A frozen image → feature map: uint8 (N, C, H, W) → float (N, ``feature_dim``).

    ``name`` identifies the extractor in cache keys. The module stays in eval mode whatever its parent
    does (``train()`` is a no-op, as in torchmetrics' ``NoTrainInceptionV3``), so a LightningModule
    that owns one cannot switch its BatchNorm layers to batch statistics.
    """

    name: str
    feature_dim: int

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the extractor's tensors live (CPU for a module without any)."""
        tensor = next(self.parameters(), None)
        if tensor is None:
            tensor = next(self.buffers(), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def forward(self, images: Tensor) -> Tensor:
        raise NotImplementedError


def default_weights_path() -> Path:
    """Where torch.hub (hence torch-fidelity) caches the Inception weights:
    ``torch.hub.get_dir()/checkpoints/WEIGHTS_FILENAME``, i.e. under ``$TORCH_HOME/hub``."""
    return Path(torch.hub.get_dir()).resolve() / "checkpoints" / WEIGHTS_FILENAME


def _resolve_weights(weights_path: str | Path | None) -> Path:
    """The explicit path if given (it must exist), else the torch.hub cache entry if present."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file {path} does not exist")
        return path
    path = default_weights_path()
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"Inception-v3 weights {WEIGHTS_FILENAME} not found in {path.parent} "
        "(torch.hub's cache: $TORCH_HOME/hub/checkpoints). They are never downloaded implicitly. "
        f"Run `{PREFETCH_COMMAND}` on a machine with internet and copy the file there, or point "
        "`callbacks.fid.extractor.weights_path` (config) / `--inception-weights` (CLI) at a local copy."
    )


class InceptionV3(FeatureExtractor):
    """torch-fidelity's ``inception-v3-compat``: pool3 features (2048-d) and ``logits_unbiased``
    (1008-d, the fc layer without its bias, which torch-fidelity's IS uses)."""

    name = "inception-v3-compat"
    feature_dim = 2048

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.weights_path = _resolve_weights(weights_path)
        self.net = _tf_inception().FeatureExtractorInceptionV3(
            name=self.name,
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(self.weights_path),
        )
        self.net.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 2048) pool3 features and (N, 1008) unbiased logits, float32, of uint8 NCHW images;
        computed in float32 as torch-fidelity does, also inside a mixed-precision autocast region."""
        images = images.to(self.device)
        with torch.autocast(images.device.type, enabled=False):
            features, logits = self.net(images)
        return features, logits

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]


def prefetch_inception(dest: Path | None = None) -> Path:
    """Downloads torch-fidelity's Inception weights to ``dest`` (a file, or a folder to put
    ``WEIGHTS_FILENAME`` in; default :func:`default_weights_path`) unless already there. The only
    function of this package that uses the network; run it once where there is internet."""
    path = default_weights_path() if dest is None else Path(dest).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_FILENAME
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(_tf_inception().URL_INCEPTION_V3, str(path))
    return path


def save_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """Writes a random-init state dict for torch-fidelity's Inception-v3 (for offline tests and
    benchmarks: the real weights cannot be fetched there).

    torch's default init is degenerate here (activations shrink layer by layer until every image has
    the same features, so FID ≈ 0 for any two sets), hence conv weights are re-drawn He-normal,
    std √(2/fan_in) (He et al. 2015), and the fc weights N(0, 1/fan_in), from ``seed``; BatchNorm keeps
    its identity statistics."""
    tf_inception = _tf_inception()

    class Unloaded(tf_inception.FeatureExtractorInceptionV3):
        """torch-fidelity's module with its layers built and no state dict loaded."""

        def load_state_dict(self, state_dict: object, strict: bool = True, assign: bool = False) -> None:
            return None

    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}):
        net = Unloaded(InceptionV3.name, ["2048"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                w = module.weight
                gain = 2.0 if isinstance(module, nn.Conv2d) else 1.0
                w.copy_(torch.randn(w.shape, generator=g) * (gain / w[0].numel()) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def to_uint8(x: Tensor) -> Tensor:
    """Images in [−1, 1] → uint8 [0, 255], rounded (half up), not truncated: ⌊127.5 x + 128⌋ clamped,
    bit for bit EDM's ``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)`` (Karras et al. 2022). Plain
    truncation, e.g. torchmetrics' ``(x * 255).byte()``, lowers every pixel by ½ on average and biases FID."""
    return (x * 127.5 + 128).floor().clamp(0, 255).to(torch.uint8)
