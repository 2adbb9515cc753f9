"""Feature extractors for image metrics: torch-fidelity's Inception-v3, DINOv2 ViT-L/14 and VGG-16, with
offline-safe weights.

Each wraps torch-fidelity's own extractor class, so its resizing and normalisation are torch-fidelity's
and the metrics computed from its features are torch-fidelity's numbers. Each takes uint8 NCHW images,
as torch-fidelity does: resizing and normalisation happen inside, never here.

* :class:`InceptionV3`, ``inception-v3-compat``: the TF 2015-12-05 graph ported to PyTorch (TF1-compatible
  bilinear resize to 299 × 299, ``(x − 128)/128``); pool3 features for FID (Heusel et al. 2017) and KID
  (Bińkowski et al. 2018), unbiased logits for IS (Salimans et al. 2016).
* :class:`DinoV2`, ``dinov2-vit-l-14``: FD-DINOv2 (Stein et al. 2023; EDM2's ``fd_dinov2``). TF1-compatible
  bilinear resize to 224 × 224, ImageNet mean/std normalisation (in 0–255 units), the class token after
  the final LayerNorm (1024-d). torch-fidelity builds the network with
  ``torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14")``, which fetches the repository's code
  from GitHub (and raises ``NotImplementedError`` for a local weights file); here the network is
  :class:`~diffusionflow.metrics.dinov2.DinoViT`, with Meta's released weights file, handed to
  torch-fidelity's class in place of that call.
* :class:`VGG16`, torch-fidelity's ``vgg16``: fc2 after its ReLU (4096-d), torch-fidelity's default
  features for precision and recall (Kynkäänniemi et al. 2019 use VGG-16's fc2); resize to 224,
  ImageNet normalisation.

The weights are never downloaded implicitly (torch-fidelity would call torch.hub, which hangs or fails
on machines without internet): the file is the explicit ``weights_path`` or the torch.hub cache entry
(``$TORCH_HOME/hub/checkpoints/``, under the name torch.hub itself would cache it), loaded with
``torch.load(weights_only=True)``; :meth:`PretrainedWeights.prefetch` is the only code that touches the
network (``python -m diffusionflow.evaluate prefetch --what inception,dinov2,vgg16``).
"""

from __future__ import annotations

import importlib
import textwrap
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar
from unittest import mock

import torch
from torch import Tensor, nn

from .dinov2 import ARCHS, DinoViT, LayerScale
from .heap import reused_heap

__all__ = [
    "EXTRACTORS",
    "PRETRAINED",
    "VGG16",
    "WEIGHTS_FILENAME",
    "DinoV2",
    "FeatureExtractor",
    "InceptionV3",
    "PretrainedWeights",
    "TorchFidelityExtractor",
    "build_extractor",
    "default_weights_path",
    "prefetch_inception",
    "save_random_dinov2_weights",
    "save_random_inception_weights",
    "save_random_vgg16_weights",
    "to_uint8",
]

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
PREFETCH_COMMAND = "python -m diffusionflow.evaluate prefetch"


def _tf(module: str) -> ModuleType:
    """A torch-fidelity module, imported on first use (torch-fidelity imports torchvision and takes
    seconds, which code that only needs :class:`FrechetStats` should not pay)."""
    return importlib.import_module(f"torch_fidelity.{module}")


# ---- weights files -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainedWeights:
    """A pretrained network's weights file: the name torch.hub caches it under, its URL, the ``--what``
    of ``prefetch`` that fetches it, and the options that point at a local copy instead."""

    what: str
    key: str
    filename: str
    url: str
    options: str

    def default_path(self) -> Path:
        """``torch.hub.get_dir()/checkpoints/<filename>``, i.e. under ``$TORCH_HOME/hub``."""
        return Path(torch.hub.get_dir()).resolve() / "checkpoints" / self.filename

    def resolve(self, weights_path: str | Path | None = None) -> Path:
        """The explicit path if given (it must exist), else the torch.hub cache entry if present; else a
        FileNotFoundError naming the file, the folder searched and the command that fetches it."""
        fetch = f"{PREFETCH_COMMAND} --what {self.key}"
        if weights_path is not None:
            path = Path(weights_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"{self.what} weights file {path} does not exist (`{fetch} --dest {path}` on a machine "
                    f"with internet downloads {self.filename} there)"
                )
            return path
        path = self.default_path()
        if path.is_file():
            return path
        raise FileNotFoundError(
            f"{self.what} weights {self.filename} not found in {path.parent} "
            "(torch.hub's cache: $TORCH_HOME/hub/checkpoints). They are never downloaded implicitly. "
            f"Run `{fetch}` on a machine with internet and copy the file there, or point "
            f"{self.options} at a local copy."
        )

    def prefetch(self, dest: str | Path | None = None) -> Path:
        """Downloads the file to ``dest`` (a file, or a folder to put ``filename`` in; default
        :meth:`default_path`) unless already there. Run it once where there is internet."""
        path = self.default_path() if dest is None else Path(dest).expanduser()
        if path.is_dir():
            path = path / self.filename
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(self.url, str(path))
        return path


def _dinov2_weights(hub_name: str) -> PretrainedWeights:
    """Meta's released DINOv2 backbone (LVD-142M), as ``torch.hub.load("facebookresearch/dinov2", …)``
    downloads and caches it."""
    return PretrainedWeights(
        what=f"DINOv2 {hub_name}",
        key="dinov2",
        filename=f"{hub_name}_pretrain.pth",
        url=f"https://dl.fbaipublicfiles.com/dinov2/{hub_name}/{hub_name}_pretrain.pth",
        options="`--dinov2-weights` (CLI) / `DinoV2(weights_path=...)`",
    )


PRETRAINED = {
    "inception": PretrainedWeights(
        what="Inception-v3",
        key="inception",
        filename=WEIGHTS_FILENAME,
        url=f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILENAME}",
        options="`callbacks.fid.extractor.weights_path` (config) / `--inception-weights` (CLI)",
    ),
    "dinov2": _dinov2_weights("dinov2_vitl14"),
    "vgg16": PretrainedWeights(
        what="VGG-16",
        key="vgg16",
        filename="vgg16-397923af.pth",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        options="`--vgg16-weights` (CLI) / `VGG16(weights_path=...)`",
    ),
}
"""``prefetch --what`` key → weights file. The URLs are torch-fidelity's, Meta's and torchvision's (the
tests check them against torch-fidelity's and torchvision's constants)."""


def default_weights_path() -> Path:
    """Where torch.hub (hence torch-fidelity) caches the Inception weights."""
    return PRETRAINED["inception"].default_path()


def prefetch_inception(dest: Path | None = None) -> Path:
    """Downloads torch-fidelity's Inception weights (see :meth:`PretrainedWeights.prefetch`)."""
    return PRETRAINED["inception"].prefetch(dest)


def _read_state(path: Path) -> dict[str, Tensor]:
    """The state dict of ``path``, memory-mapped (no copy of the file's bytes: the pages are read when the
    network first uses them), or read whole from a legacy (pre-zip, torch < 1.6) file, which cannot be."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap can only be used" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_state(net: nn.Module, path: Path, what: str) -> nn.Module:
    """``net`` (built on the meta device: nothing initialised) with the state dict of ``path`` assigned
    (strict: every parameter present, no extra ones)."""
    state = _read_state(path)
    try:
        nn.Module.load_state_dict(net, state, assign=True)  # nn.Module's: subclasses may override it
    except RuntimeError as err:  # one line per wrong tensor: the first two are named
        problems = [textwrap.shorten(line, 160, placeholder=" …") for line in str(err).splitlines()[1:]]
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ValueError(f"{path} does not hold {what} weights: {'; '.join(problems[:2])}{more}") from err
    return net


# ---- extractors --------------------------------------------------------------------------------------
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


class TorchFidelityExtractor(FeatureExtractor):
    """An extractor whose work is done by torch-fidelity's module ``self.net``, which returns a tuple of
    features; ``weights_file`` is where its weights come from."""

    weights_file: ClassVar[PretrainedWeights]
    net: nn.Module

    def _freeze(self) -> None:
        self.net.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def outputs(self, images: Tensor) -> tuple[Tensor, ...]:
        """torch-fidelity's outputs for uint8 NCHW images, computed in float32 as torch-fidelity does,
        also inside a mixed-precision autocast region; on CPU its activations are reused from the heap
        (:func:`~diffusionflow.metrics.heap.reused_heap`: the same kernels, a sixth less time)."""
        images = images.to(self.device)
        heap = reused_heap() if images.device.type == "cpu" else nullcontext()
        with heap, torch.autocast(images.device.type, enabled=False):
            return self.net(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.outputs(images)[0]


class InceptionV3(TorchFidelityExtractor):
    """torch-fidelity's ``inception-v3-compat``: pool3 features (2048-d) and ``logits_unbiased``
    (1008-d, the fc layer without its bias, which torch-fidelity's IS uses)."""

    name = "inception-v3-compat"
    feature_dim = 2048
    weights_file = PRETRAINED["inception"]

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.weights_path = self.weights_file.resolve(weights_path)
        with torch.device("meta"):  # no default init of 24 M parameters that the file overwrites
            net = _unloaded_inception(["2048", "logits_unbiased"])
        self.net = _load_state(net, self.weights_path, "torch-fidelity Inception-v3")
        self._freeze()

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 2048) pool3 features and (N, 1008) unbiased logits, float32, of uint8 NCHW images."""
        features, logits = self.outputs(images)
        return features, logits


class DinoV2(TorchFidelityExtractor):
    """torch-fidelity's DINOv2 extractor (default ``dinov2-vit-l-14``, FD-DINOv2's network; a smaller
    ``dinov2-vit-s-14`` or ``-b-14`` for experiments): the class token, 1024-d for ViT-L/14.

    The network is :class:`DinoViT` with the released weights (``dinov2_vitl14_pretrain.pth``), given to
    torch-fidelity's ``FeatureExtractorDinoV2`` in place of its ``torch.hub.load`` (see the module
    docstring); its forward (resize, normalisation, float32) is torch-fidelity's."""

    name = "dinov2-vit-l-14"
    feature_dim = 1024
    metric_name = "fd_dinov2"
    weights_file = PRETRAINED["dinov2"]

    def __init__(self, weights_path: str | Path | None = None, name: str = "dinov2-vit-l-14") -> None:
        super().__init__()
        tf_dinov2 = _tf("feature_extractor_dinov2")
        hub_name = DinoV2.hub_name(name)
        self.name, self.feature_dim = name, ARCHS[hub_name][0]
        if name != DinoV2.name:
            self.metric_name = f"fd_{name}"
        self.weights_path = _dinov2_weights(hub_name).resolve(weights_path)
        with torch.device("meta"):
            vit = DinoViT(hub_name)
        _load_state(vit, self.weights_path, f"DINOv2 {hub_name}")
        feature = tf_dinov2.FeatureExtractorDinoV2.get_default_feature_layer_for_metric("fid")
        with mock.patch.object(torch.hub, "load", return_value=vit):
            self.net = tf_dinov2.FeatureExtractorDinoV2(name, [feature])
        self._freeze()

    @staticmethod
    def hub_name(name: str) -> str:
        """torch.hub's model name of torch-fidelity's extractor ``name`` (a ValueError naming the allowed)."""
        metadata = _tf("feature_extractor_dinov2").MODEL_METADATA
        if metadata.get(name) not in ARCHS:
            allowed = [n for n, h in metadata.items() if h in ARCHS]
            raise ValueError(f"DINOv2 extractor {name!r}: allowed {allowed}")
        return metadata[name]

    @staticmethod
    def weights_of(name: str) -> PretrainedWeights:
        """The released weights file of the extractor ``name``."""
        return _dinov2_weights(DinoV2.hub_name(name))


class VGG16(TorchFidelityExtractor):
    """torch-fidelity's ``vgg16`` with its features for precision/recall (``fc2_relu``, 4096-d); the
    torchvision VGG-16 is loaded here from the weights file and given to torch-fidelity's class in place
    of its download."""

    name = "vgg16"
    feature_dim = 4096
    weights_file = PRETRAINED["vgg16"]

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        import torchvision

        self.weights_path = self.weights_file.resolve(weights_path)
        with torch.device("meta"):
            vgg = torchvision.models.vgg16()
        _load_state(vgg, self.weights_path, "torchvision VGG-16")
        tf_vgg16 = _tf("feature_extractor_vgg16")
        feature = tf_vgg16.FeatureExtractorVGG16.get_default_feature_layer_for_metric("prc")
        with mock.patch.object(tf_vgg16, "torchvision_load_pretrained_vgg16", return_value=vgg):
            self.net = tf_vgg16.FeatureExtractorVGG16(self.name, [feature])
        self._freeze()


EXTRACTORS: dict[str, type[TorchFidelityExtractor]] = {"fid": InceptionV3, "fd_dinov2": DinoV2, "prc": VGG16}
"""Metric → the network whose features it is computed on (torch-fidelity's defaults for fid and prc)."""


def build_extractor(
    metric: str, weights_path: str | Path | None = None, device: torch.device | str = "cpu", **options: Any
) -> FeatureExtractor:
    """The feature network of ``metric`` (a key of :data:`EXTRACTORS`; ``options`` go to its class, e.g.
    DINOv2's ``name``) on ``device``, its weights from ``weights_path`` or the torch.hub cache (a
    FileNotFoundError naming the file otherwise)."""
    if metric not in EXTRACTORS:
        raise ValueError(f"metric {metric!r} has no pretrained extractor; allowed: {list(EXTRACTORS)}")
    return EXTRACTORS[metric](weights_path, **options).to(device)


# ---- random-init weights for offline tests and benchmarks --------------------------------------------
def _redraw_(net: nn.Module, seed: int, gains: dict[type[nn.Module], float]) -> nn.Module:
    """Every Conv2d / Linear weight redrawn N(0, gain/fan_in) from ``seed`` (gain 2 before a ReLU: He
    et al. 2015; 1 to preserve variance), biases 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                w = module.weight
                w.copy_(torch.randn(w.shape, generator=g) * (gains[type(module)] / w[0].numel()) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
    return net


def _save(state: dict[str, Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _unloaded_inception(features: list[str]) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (its layers and forward) with no state dict
    loaded: its constructor's ``torch.load`` (``weights_only=False``) and download are bypassed."""
    tf_inception = _tf("feature_extractor_inceptionv3")

    class Unloaded(tf_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: object, strict: bool = True, assign: bool = False) -> None:
            return None

    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}):
        return Unloaded(InceptionV3.name, features)


def save_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """Writes a random-init state dict for torch-fidelity's Inception-v3 (for offline tests and
    benchmarks: the real weights cannot be fetched there).

    torch's default init is degenerate here (activations shrink layer by layer until every image has
    the same features, so FID ≈ 0 for any two sets), hence conv weights are re-drawn He-normal,
    std √(2/fan_in) (He et al. 2015), and the fc weights N(0, 1/fan_in), from ``seed``; BatchNorm keeps
    its identity statistics."""
    net = _unloaded_inception(["2048"])
    return _save(_redraw_(net, seed, {nn.Conv2d: 2.0, nn.Linear: 1.0}).state_dict(), path)


def save_random_dinov2_weights(path: Path, seed: int = 0, arch: str = "dinov2_vitl14") -> Path:
    """Writes a random-init state dict of a DINOv2 backbone (:class:`DinoViT`, the real architecture),
    loadable by :class:`DinoV2` like the released file.

    Linear and patch weights N(0, 1/fan_in) (variance-preserving, so attention logits have unit spread
    and the class token's attention is far from uniform), the class/mask tokens and position embeddings
    N(0, 0.02²) (DINOv2's init), LayerNorm and LayerScale gains 1, biases 0: the features of different
    images differ by a fair fraction of their norm (the tests check it)."""
    with torch.device("meta"):
        net = DinoViT(arch)
    net = _redraw_(net.to_empty(device="cpu"), seed, {nn.Conv2d: 1.0, nn.Linear: 1.0})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (net.cls_token, net.mask_token, net.pos_embed):
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for module in net.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, LayerScale):
                module.gamma.fill_(1.0)
    return _save(net.state_dict(), path)


def save_random_vgg16_weights(path: Path, seed: int = 0) -> Path:
    """Writes a random-init torchvision VGG-16 state dict (every conv and fc layer He-normal, biases 0),
    loadable by :class:`VGG16` and by torch-fidelity's ``feature_extractor_weights_path``."""
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.vgg16()
    net = _redraw_(net.to_empty(device="cpu"), seed, {nn.Conv2d: 2.0, nn.Linear: 2.0})
    return _save(net.state_dict(), path)


def to_uint8(x: Tensor) -> Tensor:
    """Images in [−1, 1] → uint8 [0, 255], rounded (half up), not truncated: ⌊127.5 x + 128⌋ clamped,
    bit for bit EDM's ``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)`` (Karras et al. 2022). Plain
    truncation, e.g. torchmetrics' ``(x * 255).byte()``, lowers every pixel by ½ on average and biases FID."""
    return (x * 127.5 + 128).floor().clamp(0, 255).to(torch.uint8)
