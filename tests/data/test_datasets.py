"""The datasets: toy laws, sklearn digits, CIFAR-10 and ImageNet read from files the tests write."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from diffusionflow.core.oracle import GaussianMixture
from diffusionflow.data.cifar10 import CIFAR10
from diffusionflow.data.digits import Digits
from diffusionflow.data.imagenet import ImageNetFolder, ImageNetNpz, imagenet_dataset, npz_files
from diffusionflow.data.toy2d import MIXTURES, NAMES, Toy2D, mixture
from diffusionflow.data.transforms import adm_center_crop

# ---- toy 2-D ------------------------------------------------------------------------------------


def _features(x: torch.Tensor) -> torch.Tensor:
    """First and second moments per point: x, y, x², y², xy."""
    x = x.double()
    return torch.stack([x[:, 0], x[:, 1], x[:, 0] ** 2, x[:, 1] ** 2, x[:, 0] * x[:, 1]], dim=-1)


@pytest.mark.parametrize("name", NAMES)
def test_toy_items_and_determinism(name: str) -> None:
    data = Toy2D(name, n=1000, seed=0)
    x, y = data[3]
    assert len(data) == 1000 and data.shape == (2,) and data.num_classes == 0
    assert x.shape == (2,) and x.dtype == torch.float32 and y.dtype == torch.int64 and y == 0
    assert torch.equal(data.x, Toy2D(name, n=1000, seed=0).x)
    assert not torch.allclose(data.x, Toy2D(name, n=1000, seed=1).x)
    assert isinstance(data.mixture, GaussianMixture) == (name in MIXTURES)


@pytest.mark.parametrize("name", NAMES)
def test_toy_laws_are_centred_with_unit_average_variance(name: str) -> None:
    x = Toy2D(name, n=20000).x.double()
    assert x.mean(0).abs().max() < 0.05
    assert 0.9 < x.var(0).mean() < 1.1


@pytest.mark.parametrize("name", list(MIXTURES))
def test_mixture_samples_have_the_mixture_moments(name: str) -> None:
    gm, n = mixture(name), 65536
    assert torch.allclose(gm.mean(), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert gm.covariance().trace().item() == pytest.approx(2.0, abs=1e-12)
    x = Toy2D(name, n=n).x.double()
    se_mean = (torch.diagonal(gm.covariance()) / n).sqrt()
    assert ((x.mean(0) - gm.mean()).abs() < 5 * se_mean).all()
    centred = x - gm.mean()
    products = centred[:, :, None] * centred[:, None, :]  # (n, 2, 2), mean = covariance
    se_cov = products.std(0) / n**0.5
    assert ((products.mean(0) - gm.covariance()).abs() < 5 * se_cov).all()


@pytest.mark.parametrize("name", NAMES)
def test_reference_samples_come_from_the_same_law(name: str) -> None:
    data, n = Toy2D(name, n=20000, seed=0), 20000
    fresh = data.reference_samples(n, seed=1)
    assert fresh.shape == (n, 2) and fresh.dtype == torch.float32
    assert torch.equal(fresh, data.reference_samples(n, seed=1))
    assert not torch.allclose(fresh, data.x)
    a, b = _features(data.x), _features(fresh)
    se = (a.var(0) / n + b.var(0) / n).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 4 * se).all()


def test_unknown_toy_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="checkerboard"):
        Toy2D("spiral")


# ---- digits -------------------------------------------------------------------------------------


def test_digits_splits_values_and_labels() -> None:
    train, test = Digits("train"), Digits("test")
    assert (len(train), len(test)) == (1500, 297)
    indices = torch.cat([train.indices, test.indices])
    assert torch.equal(indices.sort().values, torch.arange(1797))  # disjoint and complete
    assert torch.equal(train.indices, Digits("train").indices)
    assert not torch.equal(train.indices, Digits("train", split_seed=1).indices)
    x = torch.cat([train.x, test.x])
    assert train.shape == (1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    labels = torch.cat([train.y, test.y])
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    sk = load_digits()
    image, label = train[0]
    i = train.indices[0].item()
    assert torch.allclose(image[0], torch.from_numpy(sk.images[i]).float() / 8 - 1) and label == sk.target[i]
    assert not train.hflip


@pytest.mark.parametrize("upscale", ["nearest", "bilinear"])
def test_digits_upscaled(upscale: str) -> None:
    small, big = Digits("test"), Digits("test", resolution=16, upscale=upscale)
    assert big.shape == (1, 16, 16) and big[0][0].shape == (1, 16, 16)
    assert big.x.min() >= -1 and big.x.max() <= 1
    assert torch.allclose(big.x.mean((1, 2, 3)), small.x.mean((1, 2, 3)), atol=0.02)
    if upscale == "nearest":
        assert torch.equal(big.x, small.x.repeat_interleave(2, -1).repeat_interleave(2, -2))


# ---- CIFAR-10 -----------------------------------------------------------------------------------


def _write_pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    """A CIFAR-10 folder in the real format: 2 images per train batch, 3 test images."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        if i == 1:
            data[0, 1 * 1024 + 2 * 32 + 5] = 255  # green plane, row 2, column 5
            data[0, 2 * 1024 + 31 * 32 + 0] = 0  # blue plane, row 31, column 0
            data[0, 0 * 1024 + 0 * 32 + 1] = 51  # red plane, row 0, column 1
        _write_pickle(folder / f"data_batch_{i}", {b"data": data, b"labels": [i, 9 - i]})
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    _write_pickle(folder / "test_batch", {b"data": test, b"labels": [0, 1, 2]})
    names = b"airplane automobile bird cat deer dog frog horse ship truck".split()
    _write_pickle(folder / "batches.meta", {b"label_names": names})
    return tmp_path


def test_cifar10_reads_the_pickles(cifar_root: Path) -> None:
    train, test = CIFAR10(cifar_root, "train", hflip=False), CIFAR10(cifar_root, "test")
    assert (len(train), len(test)) == (10, 3) and train.shape == (3, 32, 32) and train.num_classes == 10
    x, y = train[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x[1, 2, 5] == 1.0 and x[2, 31, 0] == -1.0 and x[0, 0, 1].item() == pytest.approx(-0.6)
    assert train.y.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert test.y.tolist() == [0, 1, 2] and train.classes[9] == "truck"
    with (cifar_root / "cifar-10-batches-py" / "test_batch").open("rb") as f:
        raw = pickle.load(f)[b"data"][2]
    expected = torch.from_numpy(raw.reshape(3, 32, 32)).float() / 127.5 - 1
    assert torch.allclose(test[2][0], expected)


def test_cifar10_flips_train_only_by_default(cifar_root: Path) -> None:
    torch.manual_seed(0)
    train, test = CIFAR10(cifar_root, "train"), CIFAR10(cifar_root, "test")
    plain = train.x[0].float() / 127.5 - 1
    draws = [train[0][0] for _ in range(50)]
    assert any(torch.equal(x, plain) for x in draws) and any(torch.equal(x, plain.flip(-1)) for x in draws)
    assert not test.hflip and all(torch.equal(test[1][0], test.x[1].float() / 127.5 - 1) for _ in range(20))


def test_cifar10_missing_files_say_where(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(FileNotFoundError, match=str(folder)) as error:
        CIFAR10(tmp_path)
    assert "data.download=true" in str(error.value) and "data_batch_5" in str(error.value)


# ---- ImageNet -----------------------------------------------------------------------------------


def _write_npz(path: Path, labels: list[int], resolution: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, (len(labels), 3 * resolution**2), dtype=np.uint8)
    np.savez(path, data=data, labels=np.array(labels), mean=data.mean(0))
    return data


def test_imagenet_npz_reads_chw_and_zero_based_labels(tmp_path: Path) -> None:
    val = _write_npz(tmp_path / "val_data.npz", [1, 1000, 5, 42], resolution=8, seed=0)
    for i, name in enumerate(npz_files("train")):
        _write_npz(tmp_path / name, [i + 1, i + 2], resolution=8, seed=i + 1)
    data = imagenet_dataset(tmp_path, resolution=8, split="val")
    assert isinstance(data, ImageNetNpz) and len(data) == 4 and data.shape == (3, 8, 8)
    assert data.y.tolist() == [0, 999, 4, 41] and data.num_classes == 1000 and not data.hflip
    x, y = data[1]
    assert y == 999 and x[2, 3, 4].item() == pytest.approx(val[1, 2 * 64 + 3 * 8 + 4] / 127.5 - 1)
    train = ImageNetNpz(tmp_path, resolution=8, split="train")
    assert len(train) == 20 and train.y[:4].tolist() == [0, 1, 1, 2] and train.hflip


def test_imagenet_npz_wrong_resolution_or_labels(tmp_path: Path) -> None:
    _write_npz(tmp_path / "val_data.npz", [1, 2], resolution=8, seed=0)
    with pytest.raises(ValueError, match="resolution=32"):
        ImageNetNpz(tmp_path, resolution=32, split="val")
    _write_npz(tmp_path / "val_data.npz", [0, 2], resolution=8, seed=0)
    with pytest.raises(ValueError, match=r"1\.\.1000"):
        ImageNetNpz(tmp_path, resolution=8, split="val")


def test_imagenet_missing_files_say_where(tmp_path: Path) -> None:
    folder = tmp_path / "imagenet64"
    with pytest.raises(FileNotFoundError, match=str(folder)) as error:
        imagenet_dataset(folder, resolution=64, split="val")
    assert "val_data.npz" in str(error.value) and "image-net.org" in str(error.value)
    with pytest.raises(FileNotFoundError, match=str(folder / "train")):
        imagenet_dataset(folder, format="folder")
    with pytest.raises(ValueError, match="folder"):
        imagenet_dataset(folder, format="tar")


def test_adm_center_crop_keeps_the_centre() -> None:
    image = np.zeros((100, 300, 3), dtype=np.uint8)
    image[:, :100, 0], image[:, 100:200, 1], image[:, 200:, 2] = 255, 255, 255  # red | green | blue
    crop = adm_center_crop(Image.fromarray(image), 32)
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8
    assert crop[1, 2:-2, 2:-2].min() > 240 and crop[0, 2:-2, 2:-2].max() < 15


def test_imagenet_folder_layout(tmp_path: Path) -> None:
    colours = {"n02": (0, 0, 255), "n01": (255, 0, 0)}
    for wnid, colour in colours.items():
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (90, 70), colour).save(tmp_path / "train" / wnid / f"{k}.JPEG", quality=95)
    data = imagenet_dataset(tmp_path, resolution=32, format="folder", hflip=False)
    assert isinstance(data, ImageNetFolder) and len(data) == 4 and data.num_classes == 2
    x, y = data[0]
    assert x.shape == data.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0  # sorted: n01 first
    assert x[0].mean() > 0.95 and x[2].mean() < -0.95 and data[3][1] == 1
