"""Training and validation data for a run: ``load_datasets(spec) -> Splits``.

Datasets that fit in memory come back as ``TensorDataset(x float32, y int64)`` so the loop
can index the tensors directly. Nothing here downloads: MNIST-1D is generated locally with
the ``mnist1d`` package's own generator (and cached), the synthetic set is computed, and
MNIST / CIFAR-10 / ImageFolder are read from ``spec.data_root`` in their published on-disk
formats by the readers below (no torchvision needed; they also read .gz MNIST files).
A missing or unreadable ``data_root`` is a ``RunConfigError`` naming it.

The data never depends on ``spec.seed``: runs that differ only in their seed see the same
samples, so seed-to-seed variation is the training's alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from core.files import atomic_write, evict_lru, touch
from trainer import RunConfigError
from trainer.spec import DEFAULT_DATASET_SIZE, NUM_CLASSES, RunSpec, input_shape

__all__ = ["LoadCancelled", "Splits", "SyntheticDataset", "data_cache_dir", "load_datasets"]

# Fixed seed of the synthetic data (independent of spec.seed, see the module docstring).
SYNTHETIC_SEED = 20170608
# Bump when the cached MNIST-1D file layout changes, so old caches are not misread.
_MNIST1D_CACHE_VERSION = 1
# Synthetic sets larger than this are generated per sample on access instead of stored.
_IN_MEMORY_LIMIT_BYTES = 512 * 2**20


class LoadCancelled(Exception):
    """``should_stop`` answered True while the data was being generated."""


@dataclass
class Splits:
    """The training and validation sets of a run."""

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]


def data_cache_dir() -> Path:
    """$BATCHLAB_DATA_CACHE, else $BATCHLAB_HOME/data (core.settings)."""
    from core.settings import get_settings

    return get_settings().data_cache


def load_datasets(spec: RunSpec, should_stop: Callable[[], bool] | None = None) -> Splits:
    """Build (or read) the train and validation sets ``spec`` asks for.

    A long MNIST-1D generation asks ``should_stop`` about once a second and raises
    ``LoadCancelled`` when it answers True (a cancelled run does not wait for its data).
    """
    if spec.dataset == "mnist1d":
        splits = _mnist1d(spec, should_stop)
    elif spec.dataset == "synthetic":
        splits = _synthetic(spec)
    elif spec.dataset in ("mnist", "cifar10", "imagefolder"):
        try:
            splits = _from_disk(spec)
        except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            if isinstance(exc, RunConfigError):
                raise
            raise RunConfigError(f"data_root {spec.data_root!r}: {exc}") from exc
    else:
        raise ValueError(f"dataset: unknown dataset {spec.dataset!r}")
    want = spec.train_size
    if want is not None and len(splits.train) != want:  # type: ignore[arg-type]
        raise RuntimeError(
            f"dataset {spec.dataset!r} gave {len(splits.train)} training samples, "  # type: ignore[arg-type]
            f"RunSpec.train_size says {want}"
        )
    return splits


# --- MNIST-1D ---------------------------------------------------------------------------------
def _mnist1d(spec: RunSpec, should_stop: Callable[[], bool] | None = None) -> Splits:
    """MNIST-1D from the package's generator, its own 80/20 train/test split kept.

    The generator makes ``num_samples // 10`` samples per class, so a size that is not a
    multiple of 10 is generated rounded up and both sides of the split are cut to the
    sizes ``RunSpec.train_size`` promises (train: floor(0.8 N), val: the rest of N).
    """
    size = spec.dataset_size or DEFAULT_DATASET_SIZE["mnist1d"]
    assert size is not None
    arrays = mnist1d_arrays(math.ceil(size / 10) * 10, should_stop)
    n_train = spec.train_size
    assert n_train is not None
    n_val = size - n_train
    if len(arrays["y"]) < n_train or len(arrays["y_test"]) < n_val:
        raise RuntimeError(f"MNIST-1D generator gave too few samples for dataset_size={size}")
    train = TensorDataset(
        torch.from_numpy(arrays["x"][:n_train]).float(),
        torch.from_numpy(arrays["y"][:n_train]).long(),
    )
    val = TensorDataset(
        torch.from_numpy(arrays["x_test"][:n_val]).float(),
        torch.from_numpy(arrays["y_test"][:n_val]).long(),
    )
    return Splits(train, val, 10, tuple(train.tensors[0].shape[1:]))


def _mnist1d_args(num_samples: int) -> dict[str, Any]:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args["num_samples"] = num_samples
    args.pop("url", None)  # where the package's download lives: not a generator input
    return args


def mnist1d_arrays(
    num_samples: int, should_stop: Callable[[], bool] | None = None
) -> dict[str, np.ndarray]:
    """x, y, x_test, y_test of MNIST-1D with ``num_samples``, cached as .npz.

    The cache file is named by a hash of the generator arguments (and package version)
    and written to a temporary file then renamed, so concurrent workers never read a partial file.
    """
    from importlib.metadata import version

    args = _mnist1d_args(num_samples)
    # The package version is in the key too: its generator could change between releases.
    key = json.dumps(
        {"v": _MNIST1D_CACHE_VERSION, "mnist1d": version("mnist1d"), **args}, sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = data_cache_dir() / f"mnist1d-{digest}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
            touch(path)  # recently used: evicted last
            return arrays
        except (OSError, ValueError, KeyError, EOFError):
            pass  # unreadable cache (e.g. disk full when written): regenerate below
    arrays = _generate_mnist1d(args, should_stop)
    atomic_write(path, lambda fh: np.savez(fh, **arrays), fsync=False)  # a cache: regenerated
    _bound_cache(path)
    return arrays


def _bound_cache(written: Path) -> None:
    """Keep the generated files within ``Settings.data_cache_max_bytes`` (0: no bound),
    least recently used first; the file just written stays."""
    from core.settings import get_settings

    limit = get_settings().data_cache_max_bytes
    if limit > 0:
        evict_lru(written.parent, "mnist1d-*.npz", limit, keep=written)


def _generate_mnist1d(
    args: dict[str, Any], should_stop: Callable[[], bool] | None = None
) -> dict[str, np.ndarray]:
    # make_dataset, never get_dataset (which downloads). The generator reseeds Python's and
    # NumPy's global RNGs; their states are restored so the caller's randomness is untouched.
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with _polled_transform(should_stop):
            data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


@contextmanager
def _polled_transform(should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Ask ``should_stop`` about once a second while MNIST-1D generates.

    ``make_dataset`` draws its samples one by one through the module's ``transform``; the
    wrapper calls it unchanged (same random draws, so the same data) and polls between
    samples, since a large set takes minutes and the package offers no hook of its own.
    """
    if should_stop is None:
        yield
        return
    import mnist1d.data as generator

    original, last = generator.transform, time.monotonic()

    def transform(*args: Any, **kwargs: Any) -> Any:
        nonlocal last
        if time.monotonic() - last >= 1.0:
            last = time.monotonic()
            if should_stop():
                raise LoadCancelled("cancelled while MNIST-1D was being generated")
        return original(*args, **kwargs)

    generator.transform = transform
    try:
        yield
    finally:
        generator.transform = original


# --- synthetic -------------------------------------------------------------------------------
class SyntheticDataset(Dataset):
    """Class-conditional Gaussians: sample i is ``s * mu[y_i] + noise_i``.

    ``mu[c]`` ~ N(0, I) per class and noise ~ N(0, I), both from fixed seeds; with
    ``s = 3 / sqrt(D)`` the class means lie 3*sqrt(2) noise standard deviations apart
    whatever the dimension D, so the task is learnable but not trivial. Each sample's
    noise has its own seed, so any sample can be made alone (large image shapes are never
    held in memory) and the set does not depend on how it is read.
    """

    def __init__(self, indices: range, shape: tuple[int, ...], num_classes: int, size: int) -> None:
        self.indices, self.shape, self.num_classes = indices, shape, num_classes
        dim = math.prod(shape)
        gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
        self.means = torch.randn(num_classes, dim, generator=gen) * (3.0 / math.sqrt(dim))
        # Balanced labels over the whole set, shuffled once.
        labels = torch.arange(size) % num_classes
        self.labels = labels[torch.randperm(size, generator=gen)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        gen = torch.Generator().manual_seed(SYNTHETIC_SEED + 1 + j)
        y = self.labels[j]
        x = self.means[y] + torch.randn(self.means.shape[1], generator=gen)
        return x.view(self.shape), y

    def materialize(self) -> TensorDataset:
        """All samples as one in-memory TensorDataset."""
        xs, ys = zip(*(self[i] for i in range(len(self))), strict=True)
        return TensorDataset(torch.stack(xs), torch.stack(ys).long())


def _synthetic(spec: RunSpec) -> Splits:
    from trainer.spec import SYNTHETIC_VAL_FRACTION

    size = spec.dataset_size or DEFAULT_DATASET_SIZE["synthetic"]
    assert size is not None
    n_val = int(size * SYNTHETIC_VAL_FRACTION)
    shape = input_shape(spec)
    classes = NUM_CLASSES["synthetic"] or 10
    train = SyntheticDataset(range(0, size - n_val), shape, classes, size)
    val = SyntheticDataset(range(size - n_val, size), shape, classes, size)
    if size * math.prod(shape) * 4 <= _IN_MEMORY_LIMIT_BYTES:
        return Splits(train.materialize(), val.materialize(), classes, shape)
    return Splits(train, val, classes, shape)


# --- datasets on disk (never downloaded) -------------------------------------------------------
# Fixed seed of the dataset_size subset of MNIST / CIFAR-10 / ImageFolder training sets.
SUBSET_SEED = 1234
# ImageNet's per-channel statistics, used for ImageFolder (too large to measure per run).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}


def _from_disk(spec: RunSpec) -> Splits:
    root = Path(str(spec.data_root)).expanduser()
    if not root.is_dir():
        raise RunConfigError(f"data_root {str(root)!r} is not a folder")
    if spec.dataset == "imagefolder":
        return _imagefolder(spec, root)
    reader = _read_mnist if spec.dataset == "mnist" else _read_cifar10
    x_train, y_train = reader(root, "train")
    x_val, y_val = reader(root, "val")
    keep = _subset(spec, len(y_train), root)
    x_train, y_train = x_train[keep], y_train[keep]
    # Per-channel mean and std of the (used) training images, applied to both splits.
    xt = torch.from_numpy(x_train).float().div_(255)
    mean = xt.mean(dim=(0, 2, 3), keepdim=True)
    std = xt.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    xv = torch.from_numpy(x_val).float().div_(255)
    train = TensorDataset(xt.sub_(mean).div_(std), torch.from_numpy(y_train).long())
    val = TensorDataset(xv.sub_(mean).div_(std), torch.from_numpy(y_val).long())
    return Splits(train, val, 10, tuple(xt.shape[1:]))


def _subset(spec: RunSpec, available: int, root: Path) -> np.ndarray:
    """Indices of the training samples used: all, or a fixed-seed subset of dataset_size."""
    want = spec.train_size
    if want is None or want > available:
        raise RunConfigError(
            f"dataset_size: data_root {str(root)!r} holds {available} training samples, "
            f"the run needs {want}; set dataset_size <= {available}"
        )
    if want == available:
        return np.arange(available)
    gen = torch.Generator().manual_seed(SUBSET_SEED)
    return np.sort(torch.randperm(available, generator=gen)[:want].numpy())


def _read_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images (N, 1, 28, 28) uint8 and labels (N,) from the raw idx-ubyte files."""
    images, labels = (_find_mnist_file(root, name) for name in _MNIST_FILES[split])
    x = _read_idx(images, expected_magic=0x803)
    y = _read_idx(labels, expected_magic=0x801).astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return x[:, None], y


def _find_mnist_file(root: Path, name: str) -> Path:
    # torchvision's layout is root/MNIST/raw/<name>; a folder of the raw files also works.
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise RunConfigError(
        f"data_root {str(root)!r}: MNIST file {name} (or {name}.gz) not found in "
        f"{root / 'MNIST' / 'raw'}"
    )


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """An idx file (LeCun's MNIST format): big-endian magic, dims, then unsigned bytes."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != expected_magic:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(shape):
        raise ValueError(f"{path}: {len(raw) - offset} data bytes, header says {shape}")
    # A copy: frombuffer views the immutable bytes, and torch wants writable arrays.
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy()


def _read_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images (N, 3, 32, 32) uint8 and labels from the python-version pickles."""
    folder = root / _CIFAR_DIR if (root / _CIFAR_DIR).is_dir() else root
    xs, ys = [], []
    for name in _CIFAR_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise RunConfigError(
                f"data_root {str(root)!r}: CIFAR-10 file {name} not found in {root / _CIFAR_DIR}"
            )
        with open(path, "rb") as fh:
            # The official files are pickles; data_root is the user's own dataset folder.
            batch = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


class ImageFiles(Dataset):
    """Images read lazily from disk: shorter side resized to 224, centre-cropped to
    224 x 224, RGB, normalised with ImageNet's per-channel mean and std.

    Not torchvision's ImageFolder, which numbers the classes of val/ from val/'s own
    folders, so a class missing there would shift every later label; here both splits
    use train/'s class list.
    """

    def __init__(self, samples: list[tuple[Path, int]]) -> None:
        self.samples = samples
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = IMAGE_SIZE / min(w, h)
            size = (max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR)
            left, top = (size[0] - IMAGE_SIZE) // 2, (size[1] - IMAGE_SIZE) // 2
            img = img.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        x = x.permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, torch.tensor(label, dtype=torch.int64)


def _list_images(
    folder: Path, classes: list[str] | None, root: Path
) -> tuple[list[tuple[Path, int]], list[str]]:
    if not folder.is_dir():
        raise RunConfigError(
            f"data_root {str(root)!r}: expected class folders under {folder} "
            "(layout: train/<class>/*.jpg and val/<class>/*.jpg)"
        )
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    unknown = set(found) - set(classes)
    if unknown:
        raise RunConfigError(
            f"data_root {str(root)!r}: {folder.name}/ has classes not in train/: {sorted(unknown)}"
        )
    index = {c: i for i, c in enumerate(classes)}
    samples = [
        (p, index[c])
        for c in found
        for p in sorted((folder / c).iterdir())
        if p.suffix.lower() in _IMAGE_EXTENSIONS
    ]
    if not samples:
        raise RunConfigError(f"data_root {str(root)!r}: no images under {folder}")
    return samples, classes


def _imagefolder(spec: RunSpec, root: Path) -> Splits:
    train_samples, classes = _list_images(root / "train", None, root)
    if len(classes) < 2:
        raise RunConfigError(f"data_root {str(root)!r}: train/ needs at least 2 class folders")
    val_samples, _ = _list_images(root / "val", classes, root)
    keep = _subset(spec, len(train_samples), root)
    train_samples = [train_samples[i] for i in keep]
    return Splits(
        ImageFiles(train_samples),
        ImageFiles(val_samples),
        len(classes),
        (3, IMAGE_SIZE, IMAGE_SIZE),
    )
