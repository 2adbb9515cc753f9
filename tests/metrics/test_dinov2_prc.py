"""FD-DINOv2 and precision/recall: ``evaluate sets --fd-dinov2 --prc`` against torch-fidelity's
``calculate_metrics`` on the same PNGs and random-init weights files, the DINOv2 network's parameter layout,
precision/recall's closed forms, and the offline weights errors.

The real weights cannot be downloaded here. torch-fidelity builds DINOv2 with
``torch.hub.load("facebookresearch/dinov2", "dinov2_vit*14")`` (GitHub code, then the released weights);
in its run that call is answered with a :class:`DinoViT` loaded from the random-init file, so the
comparison covers image reading, torch-fidelity's resize/normalisation and the Fréchet distance, and the
network is checked against the hub code in :func:`test_dinovit_matches_the_hub_code` where that code is
cached. ViT-L/14 at 224 px costs ~1–10 s per image on a CPU, hence ViT-S/14 (same code, 12 blocks of
width 384) and tiny sets in the slow tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
import torchvision
from torch_fidelity.metric_prc import prc_features_to_metric

from diffusionflow.evaluate import main
from diffusionflow.metrics import PRETRAINED, DinoV2, build_extractor, precision_recall
from diffusionflow.metrics.dinov2 import DinoViT
from diffusionflow.metrics.extractors import save_random_dinov2_weights, save_random_vgg16_weights
from diffusionflow.metrics.images import save_png_folder, synthetic_images

PREFETCH = "python -m diffusionflow.evaluate prefetch"


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$TORCH_HOME`` = an empty folder; torch.hub's directory follows it (restored afterwards)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path


def _pngs(root: Path, **sets: torch.Tensor) -> dict[str, str]:
    for name, images in sets.items():
        save_png_folder(images, root / name)
    return {name: str(root / name) for name in sets}


@pytest.fixture(scope="module")
def vits14(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_dinov2_weights(
        tmp_path_factory.mktemp("vits14") / "s.pth", seed=0, arch="dinov2_vits14"
    )


# ---- FD-DINOv2 ---------------------------------------------------------------------------------------
def _hub_answer(weights: Path, asked: list[tuple[str, str]]):
    """What torch.hub.load returns in torch-fidelity's run: the named model, built and loaded plainly."""

    def load(repo: str, model: str, *args: object, **kwargs: object) -> DinoViT:
        asked.append((repo, model))
        net = DinoViT(model)
        net.load_state_dict(torch.load(weights, weights_only=True))
        return net

    return load


@pytest.mark.slow
@pytest.mark.usefixtures("offline")
def test_fd_dinov2_matches_torch_fidelity(
    vits14: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--dinov2-model`` ViT-S/14 (the ViT-L/14 of FD-DINOv2 is the same code at 24 blocks of width
    1024, ~20× the CPU time; its layout is checked below) on 3 + 4 images of 32 × 32."""
    sets = _pngs(
        tmp_path,
        a=synthetic_images(3, seed=1, cells=4, tint=0.0),
        b=synthetic_images(4, seed=2, cells=8, tint=0.3),
    )
    model = "dinov2-vit-s-14"
    args = ["--fd-dinov2", "--dinov2-model", model, "--dinov2-weights", str(vits14)]
    ours = main(["sets", sets["a"], sets["b"], *args])
    assert ours["extractor_fd_dinov2"] == model
    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(torch.hub, "load", _hub_answer(vits14, asked))
    theirs = torch_fidelity.calculate_metrics(
        input1=sets["a"],
        input2=sets["b"],
        fid=True,
        feature_extractor=model,
        cuda=False,
        cache=False,
        verbose=False,
        datasets_download=False,
    )
    assert asked == [("facebookresearch/dinov2", "dinov2_vits14")]
    fd = theirs["frechet_inception_distance"]
    assert fd > 1.0, "a degenerate network gives FD ≈ 0 for any two sets"
    assert ours[f"fd_{model}"] == pytest.approx(fd, rel=1e-6)


def test_an_unknown_dinov2_model_is_refused_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = _pngs(tmp_path, a=synthetic_images(2, seed=1), b=synthetic_images(2, seed=2))
    with pytest.raises(SystemExit) as exit_info:
        main(["sets", sets["a"], sets["b"], "--fd-dinov2", "--dinov2-model", "dinov2-vit-x-14"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--dinov2-model dinov2-vit-x-14" in err and "dinov2-vit-l-14" in err


def test_dinovit_has_the_released_parameter_layout() -> None:
    """ViT-L/14's state dict names and shapes, as in ``dinov2_vitl14_pretrain.pth`` (DINOv2's
    ``DinoVisionTransformer``: img_size 518, patch 14, width 1024, 24 blocks, LayerScale, no registers),
    so the released file loads strictly."""
    d, blocks, grid = 1024, 24, 518 // 14
    expected = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, 14, 14),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(blocks):
        for name, shape in {
            "norm1.weight": (d,),
            "norm1.bias": (d,),
            "attn.qkv.weight": (3 * d, d),
            "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d),
            "attn.proj.bias": (d,),
            "ls1.gamma": (d,),
            "norm2.weight": (d,),
            "norm2.bias": (d,),
            "mlp.fc1.weight": (4 * d, d),
            "mlp.fc1.bias": (4 * d,),
            "mlp.fc2.weight": (d, 4 * d),
            "mlp.fc2.bias": (d,),
            "ls2.gamma": (d,),
        }.items():
            expected[f"blocks.{i}.{name}"] = shape
    with torch.device("meta"):
        net = DinoViT("dinov2_vitl14")
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == expected


def test_dinov2_extractor(vits14: Path) -> None:
    """The ViT-S/14 extractor: frozen, float32 under autocast, the random-init features of different
    images far apart (relative to their norm, √width after the final LayerNorm)."""
    net = DinoV2(vits14, name="dinov2-vit-s-14")
    assert (net.feature_dim, net.metric_name) == (384, "fd_dinov2-vit-s-14")
    net.train()
    assert not net.training and not net.net.training
    assert not any(p.requires_grad for p in net.parameters())
    images = torch.cat([synthetic_images(2, seed=1), synthetic_images(1, seed=2, cells=8, tint=0.3)])
    features = net(images)
    assert features.shape == (3, 384) and features.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(net(images), features)
    distances = torch.cdist(features, features)[~torch.eye(3, dtype=torch.bool)]
    assert distances.min() > 0.05 * 384**0.5
    with pytest.raises(ValueError, match=re.escape("allowed ['dinov2-vit-s-14', 'dinov2-vit-b-14'")):
        DinoV2(vits14, name="dinov2-vit-g-14")


# ---- precision / recall ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.usefixtures("offline")
def test_prc_matches_torch_fidelity(tmp_path: Path) -> None:
    """VGG-16 (torch-fidelity's default extractor for prc, loaded by torch-fidelity itself from the file)
    on 6 + 6 images, INPUT2 half like INPUT1, half uniform noise: the same precision, recall and F-score."""
    weights = save_random_vgg16_weights(tmp_path / "vgg16.pth", seed=0)
    noise = torch.randint(
        0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8
    )
    sets = _pngs(
        tmp_path,
        a=synthetic_images(6, seed=1, cells=4),
        b=torch.cat([synthetic_images(3, seed=2, cells=4), noise]),
    )
    ours = main(["sets", sets["a"], sets["b"], "--prc", "--vgg16-weights", str(weights)])
    theirs = torch_fidelity.calculate_metrics(
        input1=sets["a"],
        input2=sets["b"],
        prc=True,
        feature_extractor_weights_path=str(weights),
        cuda=False,
        cache=False,
        verbose=False,
        datasets_download=False,
    )
    assert 0 < theirs["precision"] < 1 or 0 < theirs["recall"] < 1, "an informative case"
    assert {k: ours[k] for k in theirs} == theirs
    assert ours["extractor_prc"] == "vgg16"


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_equal_torch_fidelity_on_features(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    generated = torch.randn(60, 16, generator=g) * 1.3 + 0.4
    real = torch.randn(75, 16, generator=g)
    ours = precision_recall(generated, real, k=k, batch_size=7)
    for save_cpu_ram in (False, True):
        theirs = prc_features_to_metric(
            generated,
            real,
            prc_neighborhood=k,
            prc_batch_size=10_000,
            save_cpu_ram=save_cpu_ram,
            verbose=False,
        )
        assert ours == theirs
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1


def test_precision_recall_closed_forms() -> None:
    """Identical sets: 1, 1. Disjoint: 0, 0. Generated = the real points of one of two far-apart
    modes (mode collapse): precision 1, recall ½ (each real point of that mode is a generated point)."""
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g) + 100])
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0, "f_score": 1.0}
    far = precision_recall(real + 1000, real)
    assert (far["precision"], far["recall"], far["f_score"]) == (0.0, 0.0, 0.0)
    collapsed = precision_recall(real[:20], real)
    assert (collapsed["precision"], collapsed["recall"]) == (1.0, 0.5)
    assert collapsed["f_score"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=re.escape("k must be in [1, 3] for sets of 4 and 40")):
        precision_recall(real[:4], real, k=4)
    with pytest.raises(ValueError, match="one dim"):
        precision_recall(real[:, :4], real)


# ---- weights: offline errors, prefetch ---------------------------------------------------------------
@pytest.fixture
def png_sets(tmp_path: Path) -> dict[str, str]:
    return _pngs(tmp_path, a=synthetic_images(5, seed=1), b=synthetic_images(5, seed=2))


def _sets_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["sets", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.usefixtures("offline")
def test_missing_weights_stop_sets_before_any_image_is_read(
    png_sets: dict[str, str],
    empty_torch_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_reading(*args: object, **kwargs: object) -> None:
        pytest.fail("images were read before the weights were checked")

    monkeypatch.setattr("diffusionflow.metrics.images.image_batches", no_reading)
    monkeypatch.setattr("diffusionflow.evaluate._inception", no_reading)
    cache = (empty_torch_home / "hub" / "checkpoints").resolve()
    a, b = png_sets["a"], png_sets["b"]
    for flag, key, filename, option in (
        ("--fd-dinov2", "dinov2", "dinov2_vitl14_pretrain.pth", "--dinov2-weights"),
        ("--prc", "vgg16", "vgg16-397923af.pth", "--vgg16-weights"),
    ):
        err = _sets_error([a, b, flag, "--fid"], capsys)
        for needle in (f"{filename} not found in {cache}", f"`{PREFETCH} --what {key}`", option):
            assert needle in err
        missing = empty_torch_home / "elsewhere" / "w.pth"
        err = _sets_error([a, b, flag, option, str(missing)], capsys)
        assert f"weights file {missing} does not exist (`{PREFETCH} --what {key} --dest {missing}`" in err


@pytest.mark.usefixtures("offline")
def test_missing_weights_in_the_library(empty_torch_home: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("dinov2_vitl14_pretrain.pth not found in")):
        DinoV2()
    with pytest.raises(FileNotFoundError, match=re.escape("vgg16-397923af.pth not found in")):
        build_extractor("prc")
    with pytest.raises(ValueError, match=re.escape("allowed: ['fid', 'fd_dinov2', 'prc']")):
        build_extractor("kid")


def test_a_wrong_weights_file_is_named(
    png_sets: dict[str, str], vits14: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ViT-S/14 weights given for ViT-L/14: a clean error naming the file, not a traceback."""
    err = _sets_error([png_sets["a"], png_sets["b"], "--fd-dinov2", "--dinov2-weights", str(vits14)], capsys)
    assert err.startswith(f"error: {vits14} does not hold DINOv2 dinov2_vitl14 weights: ")


def test_sets_check_the_neighbourhood(png_sets: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = png_sets["a"], png_sets["b"]
    err = _sets_error([a, b, "--prc", "--prc-neighborhood", "5"], capsys)
    assert "--prc-neighborhood 5 must be < 5 (the smaller set's size)" in err
    assert "--prc-neighborhood 0 must be >= 1" in _sets_error(
        [a, b, "--prc", "--prc-neighborhood", "0"], capsys
    )
    assert "--fd-dinov2 or --prc" in _sets_error([a, b], capsys)


def test_weights_urls_are_their_sources() -> None:
    """The files are cached under the names torch.hub gives the URLs' files."""
    assert PRETRAINED["inception"].url == tf_inception.URL_INCEPTION_V3
    assert PRETRAINED["vgg16"].url == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    for weights in PRETRAINED.values():
        assert weights.url.rsplit("/", 1)[1] == weights.filename


def test_prefetch_what(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No network here: the download itself is replaced; the command's plumbing is tested."""
    urls = []

    def fake_download(url: str, dst: str) -> None:
        urls.append(url)
        Path(dst).write_bytes(b"w")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    dest = tmp_path / "weights"
    main(["prefetch", "--what", "dinov2,vgg16", "--dest", str(dest)])
    names = [PRETRAINED[k].filename for k in ("dinov2", "vgg16")]
    assert capsys.readouterr().out.split() == [str(dest / n) for n in names]
    assert urls == [PRETRAINED["dinov2"].url, PRETRAINED["vgg16"].url]
    main(["prefetch", "--what", "vgg16,dinov2", "--dest", str(dest)])
    assert len(urls) == 2, "present: no download"
    for args, message in (
        (["--what", "dinov2,clip"], "--what dinov2,clip: allowed a comma-separated list from"),
        (["--what", "dinov2,dinov2"], "allowed a comma-separated list"),
        (["--what", "inception,vgg16", "--dest", str(dest / names[0])], "is a file: --what"),
    ):
        with pytest.raises(SystemExit):
            main(["prefetch", *args])
        assert message in capsys.readouterr().err
