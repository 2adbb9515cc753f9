"""Contract tests for the backbones: ``backbone(z_in, c_noise, labels=None)`` has ``z_in``'s shape."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from diffusionflow.nn import DIT_PRESETS, MLP, UNET_PRESETS, DiT, FourierEmbedding, UNet
from diffusionflow.paths import CONFIG_DIR

CONF_DIR = CONFIG_DIR / "backbone"
NUM_CLASSES = 3

Factory = Callable[[int], nn.Module]
BACKBONES: dict[str, tuple[Factory, tuple[int, ...]]] = {
    "mlp": (lambda nc: MLP([2], nc), (2,)),
    "unet_tiny_8": (lambda nc: UNet.preset("tiny", [1, 8, 8], nc), (1, 8, 8)),
    "unet_tiny_32": (lambda nc: UNet.preset("tiny", [3, 32, 32], nc), (3, 32, 32)),
    # The DDPM++ switches (additive embedding, projected resampling skips) and ADM's per-head width and
    # attention after every decoder block, on a small network.
    "unet_variants_16": (
        lambda nc: UNet.preset(
            "tiny",
            [3, 16, 16],
            nc,
            adaptive_scale=False,
            resample_proj=True,
            attn_every_decoder_block=True,
            head_channels=6,
            attn_resolutions=(8, 4),
        ),
        (3, 16, 16),
    ),
    "dit_tiny": (lambda nc: DiT.preset("dit_tiny", [3, 16, 16], nc), (3, 16, 16)),
}
NAMES = list(BACKBONES)


def build(name: str, num_classes: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    factory, _ = BACKBONES[name]
    return factory(num_classes).to(dtype)


def inputs(name: str, batch: int = 4, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = BACKBONES[name][1]
    z = torch.randn(batch, *shape, generator=generator, dtype=dtype)
    c_noise = torch.empty(batch, dtype=dtype).uniform_(-5, 5, generator=generator)
    return z, c_noise


def all_labels(batch: int) -> Tensor:
    """Labels cycling through every class and the null label."""
    return torch.arange(batch) % (NUM_CLASSES + 1)


@torch.no_grad()
def unzero(model: nn.Module) -> nn.Module:
    """Randomise every all-zero parameter (zero-initialised output, residual, adaLN layers; norm biases)."""
    generator = torch.Generator().manual_seed(123)
    for p in model.parameters():
        if not p.any():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def train_steps(model: nn.Module, name: str, steps: int = 3) -> nn.Module:
    """A few Adam steps on random targets, starting from the zero-initialised output."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    z, c_noise = inputs(name, batch=8)
    target = torch.randn_like(z)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model(z, c_noise, all_labels(8)) - target).square().mean()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_output_shape_dtype_and_zero_init(name: str, dtype: torch.dtype) -> None:
    model = build(name, dtype=dtype)
    z, c_noise = inputs(name, dtype=dtype)
    out = model(z, c_noise)
    assert out.shape == z.shape and out.dtype == dtype
    assert torch.all(out == 0), "the output layer should be zero-initialised"
    out = unzero(model)(z, c_noise)
    assert out.shape == z.shape and torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_autocast(name: str) -> None:
    model = unzero(build(name, NUM_CLASSES))
    z, c_noise = inputs(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(z, c_noise, all_labels(4))
    assert out.shape == z.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_conditioning_matters_after_training(name: str) -> None:
    model = train_steps(build(name, NUM_CLASSES), name)
    z, _ = inputs(name)
    batch = z.shape[0]
    with torch.no_grad():

        def run(c: float, label: int | None) -> Tensor:
            labels = None if label is None else torch.full((batch,), label)
            return model(z, torch.full((batch,), c), labels)

        base = run(0.5, 0)
        assert not torch.allclose(base, run(-1.0, 0), atol=1e-6), "c_noise is ignored"
        assert not torch.allclose(base, run(0.5, 1), atol=1e-6), "labels are ignored"
        assert not torch.allclose(base, run(0.5, None), atol=1e-6), "null label equals a real label"
        torch.testing.assert_close(run(0.5, None), run(0.5, NUM_CLASSES), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = unzero(build(name, NUM_CLASSES, dtype=torch.float64))
    z, c_noise = inputs(name, dtype=torch.float64)
    model(z, c_noise, all_labels(4)).square().mean().backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None, f"{param_name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{param_name} has non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_scalar_c_noise_matches_repeated(name: str) -> None:
    model = unzero(build(name, NUM_CLASSES)).eval()
    z, _ = inputs(name)
    labels = all_labels(4)
    with torch.no_grad():
        scalar = model(z, torch.tensor(0.7), labels)
        repeated = model(z, torch.full((4,), 0.7), labels)
    torch.testing.assert_close(scalar, repeated, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_batch_independence(name: str) -> None:
    model = unzero(build(name, NUM_CLASSES, dtype=torch.float64)).eval()
    z, c_noise = inputs(name, dtype=torch.float64)
    labels = all_labels(4)
    with torch.no_grad():
        batched = model(z, c_noise, labels)
        for i in range(z.shape[0]):
            alone = model(z[i : i + 1], c_noise[i : i + 1], labels[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-9, atol=1e-9)


def test_unet_channels_last() -> None:
    model = unzero(build("unet_tiny_32", NUM_CLASSES)).eval()
    z, c_noise = inputs("unet_tiny_32")
    with torch.no_grad():
        expected = model(z, c_noise, all_labels(4))
        model = model.to(memory_format=torch.channels_last)
        out = model(z.to(memory_format=torch.channels_last), c_noise, all_labels(4))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["unet_tiny_32", "dit_tiny", "mlp"])
def test_torch_compile_full_graph(name: str) -> None:
    model = unzero(build(name, NUM_CLASSES)).eval()
    z, c_noise = inputs(name)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(z, c_noise, all_labels(4)), model(z, c_noise, all_labels(4)))


def test_mlp_fourier_frequencies_round_trip() -> None:
    model = unzero(build("mlp", NUM_CLASSES))
    state = model.state_dict()
    assert "embed.noise_features.freqs" in state
    torch.manual_seed(99)
    clone = MLP([2], NUM_CLASSES)
    clone.load_state_dict(state)
    z, c_noise = inputs("mlp")
    torch.testing.assert_close(clone(z, c_noise), model(z, c_noise), rtol=0, atol=0)
    assert torch.equal(FourierEmbedding(8, seed=3).freqs, FourierEmbedding(8, seed=3).freqs)
    assert not torch.equal(FourierEmbedding(8, seed=3).freqs, FourierEmbedding(8, seed=4).freqs)


def test_bad_arguments_raise_value_error() -> None:
    unconditional = build("unet_tiny_8")
    z, c_noise = inputs("unet_tiny_8")
    with pytest.raises(ValueError, match="num_classes=0"):
        unconditional(z, c_noise, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="c_noise"):
        unconditional(z, torch.zeros(3))
    with pytest.raises(ValueError, match="z_in"):
        unconditional(torch.zeros(4, 1, 16, 16), c_noise)
    with pytest.raises(ValueError, match="num_heads=5"):
        UNet.preset("tiny", [1, 8, 8], num_heads=5)
    with pytest.raises(ValueError, match="head_channels=5"):
        UNet.preset("tiny", [1, 8, 8], head_channels=5)
    with pytest.raises(ValueError, match="resolution 30"):
        UNet.preset("tiny", [3, 30, 30])
    with pytest.raises(ValueError, match=r"attn_resolutions=\(16,\) contains \[16\]"):
        UNet.preset("tiny", [1, 8, 8], attn_resolutions=(16,))
    with pytest.raises(ValueError, match="name='huge'"):
        UNet.preset("huge", [1, 8, 8])
    with pytest.raises(ValueError, match="num_heads=5"):
        DiT.preset("dit_tiny", [3, 16, 16], num_heads=5)
    with pytest.raises(ValueError, match="patch_size=3"):
        DiT.preset("dit_tiny", [3, 16, 16], patch_size=3)
    with pytest.raises(ValueError, match="emb_dim"):
        MLP([2], emb_dim=7)
    with pytest.raises(ValueError, match="num_classes=0"):
        MLP([2])(torch.zeros(2, 2), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts() -> None:
    with torch.device("meta"):
        ddpmpp = count(UNet.preset("ddpmpp_cifar", [3, 32, 32]))
        adm = count(UNet.preset("adm_imagenet64", [3, 64, 64], num_classes=1000))
        dit_s2 = count(DiT.preset("dit_s2", [3, 32, 32]))
        dit_b2 = count(DiT.preset("dit_b2", [3, 32, 32]))
        tiny = [count(UNet.preset("tiny", shape)) for shape in ([1, 8, 8], [3, 32, 32])]
    assert ddpmpp == 55_732_739 and abs(ddpmpp / 55.73e6 - 1) < 0.01  # EDM Table 7: 55.73M
    assert adm == 295_900_035 and abs(adm / 295.90e6 - 1) < 0.01  # EDM Table 7: 295.90M
    assert dit_s2 == 32_471_436 and dit_b2 == 129_528_588  # DiT paper: 33M, 130M
    assert all(50_000 <= n <= 150_000 for n in tiny), tiny


def test_edm_augmentation_labels_add_a_bias_free_map_into_the_noise_features() -> None:
    """EDM's DDPM++ with ``augment_dim=9`` (its CIFAR-10 training): a 9→128 linear map without bias before the
    noise MLP, 9·128 = 1,152 weights: 55,733,891 in all (EDM, Table 7: 55.73M)."""
    with torch.device("meta"):
        plain = count(UNet.preset("ddpmpp_cifar", [3, 32, 32]))
        augmented = count(UNet.preset("ddpmpp_cifar", [3, 32, 32], augment_dim=9))
    assert augmented - plain == 9 * UNET_PRESETS["ddpmpp_cifar"]["model_channels"]
    assert augmented == 55_733_891 and round(augmented / 1e6, 2) == 55.73


def test_augment_labels_condition_the_unet() -> None:
    """None (sampling) is the same as all-zero labels; other labels change the output; bad ones raise."""
    model = unzero(UNet.preset("tiny", [1, 8, 8], augment_dim=3)).eval()
    z, c_noise = inputs("unet_tiny_8")
    labels = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        none, zeros = model(z, c_noise), model(z, c_noise, augment_labels=torch.zeros(4, 3))
        other = model(z, c_noise, augment_labels=labels)
    assert torch.equal(none, zeros) and (other - none).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"augment_labels must have shape \(4, 3\)"):
        model(z, c_noise, augment_labels=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="augment_dim=0"):
        build("unet_tiny_8")(z, c_noise, augment_labels=labels)


def test_ddpmpp_cifar_single_forward() -> None:
    torch.manual_seed(0)
    model = unzero(UNet.preset("ddpmpp_cifar", [3, 32, 32], num_classes=10)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor(0.3), torch.tensor([10]))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


DATA_SHAPES = {"mlp": [2], "adm_imagenet64": [3, 64, 64]}
EXPECTED_KWARGS = {
    "mlp": {
        k: p.default
        for k, p in inspect.signature(MLP).parameters.items()
        if k not in ("shape", "num_classes")
    },
    "unet_tiny": UNET_PRESETS["tiny"],
    "ddpmpp_cifar": UNET_PRESETS["ddpmpp_cifar"],
    "adm_imagenet64": UNET_PRESETS["adm_imagenet64"],
    "dit_s2": DIT_PRESETS["dit_s2"],
    "dit_b2": DIT_PRESETS["dit_b2"],
}


@pytest.mark.parametrize("config", list(EXPECTED_KWARGS))
def test_hydra_config_instantiates_and_matches_preset(config: str) -> None:
    shape = DATA_SHAPES.get(config, [3, 32, 32])
    backbone = OmegaConf.load(CONF_DIR / f"{config}.yaml")
    cfg = OmegaConf.create({"data": {"shape": shape, "num_classes": 10}, "backbone": backbone})
    with torch.device("meta"):
        model = instantiate(cfg.backbone)
    assert tuple(model.shape) == tuple(shape) and model.num_classes == 10
    written = OmegaConf.to_container(backbone)
    assert isinstance(written, dict)
    kwargs = {k: v for k, v in written.items() if k not in ("_target_", "shape", "num_classes")}
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in EXPECTED_KWARGS[config].items()}
    assert kwargs == expected
