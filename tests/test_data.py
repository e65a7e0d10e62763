"""Datasets: MNIST-1D generation and cache, synthetic data, and the on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from trainer import RunConfigError, data
from trainer.data import SyntheticDataset, data_cache_dir, load_datasets
from trainer.spec import RunSpec


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("BATCHLAB_DATA_CACHE", str(cache))
    return cache


# --- MNIST-1D ------------------------------------------------------------------------------------
def test_mnist1d_shapes_split_and_cache(_cache: Path, monkeypatch) -> None:
    spec = RunSpec(dataset="mnist1d", dataset_size=200, batch_per_worker=8)
    np_state = np.random.get_state()[1].copy()
    py_state = random.getstate()
    splits = load_datasets(spec)
    # The generator reseeds the global RNGs; the caller's state must be left alone.
    assert (np.random.get_state()[1] == np_state).all() and random.getstate() == py_state

    assert isinstance(splits.train, TensorDataset) and isinstance(splits.val, TensorDataset)
    x, y = splits.train.tensors
    assert x.shape == (160, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(splits.train) == spec.train_size == 160 and len(splits.val) == 40
    assert splits.num_classes == 10 and splits.input_shape == (40,)
    assert set(y.tolist()) == set(range(10))

    files = list(_cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind

    def regenerate(*args, **kwargs):
        raise AssertionError("cached data was generated again")

    monkeypatch.setattr(data, "_generate_mnist1d", regenerate)
    again = load_datasets(spec.model_copy(update={"seed": 5}))  # the seed never changes data
    assert torch.equal(again.train.tensors[0], x) and torch.equal(
        again.val.tensors[1], splits.val.tensors[1]
    )


def test_mnist1d_is_the_package_generator_output() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 200
    ref = make_dataset(args)
    splits = load_datasets(RunSpec(dataset="mnist1d", dataset_size=200, batch_per_worker=8))
    np.testing.assert_allclose(splits.train.tensors[0].numpy(), ref["x"], rtol=1e-6)
    np.testing.assert_array_equal(splits.val.tensors[1].numpy(), ref["y_test"])


def test_mnist1d_size_not_multiple_of_ten_agrees_with_runspec() -> None:
    spec = RunSpec(dataset="mnist1d", dataset_size=205, batch_per_worker=8)
    splits = load_datasets(spec)
    assert len(splits.train) == spec.train_size == 164
    assert len(splits.val) == 205 - 164


def test_cache_dir_defaults(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("BATCHLAB_DATA_CACHE")
    monkeypatch.setenv("BATCHLAB_HOME", str(tmp_path / "home"))
    assert data_cache_dir() == tmp_path / "home" / "data"
    monkeypatch.delenv("BATCHLAB_HOME")
    assert data_cache_dir() == Path(".batchlab") / "data"


# --- synthetic -------------------------------------------------------------------------------
def test_synthetic_deterministic_sized_and_learnable() -> None:
    spec = RunSpec(model="mlp", dataset="synthetic", dataset_size=1000, batch_per_worker=8)
    a, b = load_datasets(spec), load_datasets(spec.model_copy(update={"seed": 3}))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert len(a.train) == spec.train_size == 800 and len(a.val) == 200
    x, y = a.train.tensors
    assert x.shape == (800, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).min() > 50  # balanced classes
    # Learnable: nearest class mean (estimated on train) classifies val far above chance.
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    xv, yv = a.val.tensors
    err = (torch.cdist(xv, means).argmin(1) != yv).float().mean().item()
    assert err < 0.4


def test_synthetic_follows_model_input_shape_and_lazy_path(monkeypatch) -> None:
    spec = RunSpec(model="resnet20", dataset="synthetic", dataset_size=50, batch_per_worker=8)
    eager = load_datasets(spec)
    assert eager.input_shape == (3, 32, 32) and eager.train.tensors[0].shape == (40, 3, 32, 32)
    monkeypatch.setattr(data, "_IN_MEMORY_LIMIT_BYTES", 0)
    lazy = load_datasets(spec)
    assert isinstance(lazy.train, SyntheticDataset) and len(lazy.val) == 10
    x7, y7 = lazy.train[7]
    assert torch.equal(x7, eager.train.tensors[0][7]) and y7 == eager.train.tensors[1][7]


# --- on-disk formats ------------------------------------------------------------------------------
def _write_idx(path: Path, arr: np.ndarray, magic: int, compress: bool) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _mnist_root(tmp_path: Path, n_train: int = 30, n_val: int = 10, compress: bool = False):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n, prefix in (("train", n_train, "train"), ("val", n_val, "t10k")):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x, 0x803, compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, 0x801, compress)
        arrays[split] = (x, y)
    return tmp_path / "mnist", arrays


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files(tmp_path, compress) -> None:
    root, arrays = _mnist_root(tmp_path, compress=compress)
    spec = RunSpec(
        model="simple_cnn",
        dataset="mnist",
        data_root=str(root),
        dataset_size=30,
        batch_per_worker=4,
    )
    splits = load_datasets(spec)
    x, y = splits.train.tensors
    assert x.shape == (30, 1, 28, 28) and splits.val.tensors[0].shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(y.numpy(), arrays["train"][1])
    # Normalised per channel with the training statistics.
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    raw = arrays["train"][0].astype(np.float32) / 255
    expected = (raw - raw.mean()) / raw.std(ddof=1)
    np.testing.assert_allclose(x[:, 0].numpy(), expected, atol=1e-4)


def test_mnist_subset_and_errors(tmp_path) -> None:
    root, arrays = _mnist_root(tmp_path)
    spec = RunSpec(
        model="simple_cnn",
        dataset="mnist",
        data_root=str(root),
        dataset_size=12,
        batch_per_worker=4,
    )
    a, b = load_datasets(spec), load_datasets(spec)
    assert len(a.train) == 12 and torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert set(a.train.tensors[1].tolist()) <= set(arrays["train"][1].tolist())

    too_many = spec.model_copy(update={"dataset_size": 31})
    with pytest.raises(ValueError, match="dataset_size.*holds 30"):
        load_datasets(too_many)

    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(RunConfigError, match=r"data_root .*t10k-labels-idx1-ubyte"):
        load_datasets(spec)
    with pytest.raises(RunConfigError, match="data_root"):
        load_datasets(spec.model_copy(update={"data_root": str(tmp_path / "nowhere")}))


def test_idx_bad_magic(tmp_path) -> None:
    root, _ = _mnist_root(tmp_path)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x09\x99" + path.read_bytes()[4:])
    spec = RunSpec(
        model="simple_cnn",
        dataset="mnist",
        data_root=str(root),
        dataset_size=30,
        batch_per_worker=4,
    )
    with pytest.raises(ValueError, match="magic"):
        load_datasets(spec)


def _cifar_root(tmp_path: Path, per_batch: int = 4):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": x, b"labels": labels, b"batch_label": name.encode()}, fh)
        out[name] = (x, labels)
    return tmp_path / "cifar", out


def test_cifar10_pickles(tmp_path) -> None:
    root, batches = _cifar_root(tmp_path)
    spec = RunSpec(
        model="resnet20",
        dataset="cifar10",
        data_root=str(root),
        dataset_size=20,
        batch_per_worker=4,
    )
    splits = load_datasets(spec)
    x, y = splits.train.tensors
    assert x.shape == (20, 3, 32, 32) and len(splits.val) == 4
    expected_y = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert y.tolist() == expected_y
    # Channel-first layout: the first 1024 bytes of a row are the red plane.
    first = batches["data_batch_1"][0][0].reshape(3, 32, 32).astype(np.float32) / 255
    raw = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    raw = raw.reshape(-1, 3, 32, 32).astype(np.float32) / 255
    mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3), ddof=1)
    expected = (first - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-4)
    for c in range(3):
        assert abs(x[:, c].mean().item()) < 1e-4


def test_cifar10_missing_batch(tmp_path) -> None:
    root, _ = _cifar_root(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    spec = RunSpec(
        model="resnet20", dataset="cifar10", data_root=str(root), dataset_size=8, batch_per_worker=4
    )
    with pytest.raises(RunConfigError, match="data_root.*data_batch_3"):
        load_datasets(spec)


def _imagefolder_root(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "imgs"
    sizes = [(300, 250), (240, 400), (224, 224)]
    for split, classes in (("train", ["cat", "dog", "eel"]), ("val", ["cat", "eel"])):
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i, size in enumerate(sizes):
                color = (40 * ci + 10 * i, 255 - 30 * ci, 100)
                Image.new("RGB", size, color).save(folder / f"{i}.png")
            (folder / "notes.txt").write_text("not an image")
    return root


def test_imagefolder(tmp_path) -> None:
    root = _imagefolder_root(tmp_path)
    spec = RunSpec(
        model="resnet50",
        dataset="imagefolder",
        data_root=str(root),
        dataset_size=6,
        batch_per_worker=2,
    )
    splits = load_datasets(spec)
    assert splits.num_classes == 3 and splits.input_shape == (3, 224, 224)
    assert len(splits.train) == 6 and len(splits.val) == 6
    x, y = splits.val[len(splits.val) - 1]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert y.item() == 2  # val/ lacks "dog": "eel" keeps train's index 2
    # A flat colour comes back as its normalised value everywhere.
    r = (40 * 1 + 10 * 2) / 255  # val "eel" is val's second class folder, image 2
    expected = (r - data.IMAGENET_MEAN[0]) / data.IMAGENET_STD[0]
    torch.testing.assert_close(x[0], torch.full((224, 224), expected), atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="dataset_size"):
        load_datasets(spec.model_copy(update={"dataset_size": 10}))
    (root / "val" / "fox").mkdir()
    with pytest.raises(ValueError, match="fox"):
        load_datasets(spec)


def test_imagefolder_missing_split(tmp_path) -> None:
    root = _imagefolder_root(tmp_path)
    for p in sorted((root / "val").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "val").rmdir()
    spec = RunSpec(
        model="resnet50",
        dataset="imagefolder",
        data_root=str(root),
        dataset_size=6,
        batch_per_worker=2,
    )
    with pytest.raises(RunConfigError, match="data_root.*val"):
        load_datasets(spec)
