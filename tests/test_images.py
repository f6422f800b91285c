"""ppvi.images: IDX files against the real MNIST test set, the MNIST loader, the 8x8 digits, binarization."""

from __future__ import annotations

import gzip
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ppvi.errors import DataError
from ppvi.images import binarize, check_unit_interval, load_digits, load_mnist, read_idx, write_idx

# The real MNIST test set, byte-identical to the canonical distribution (its README and MD5SUMS).
# Test data only: ppvi never reads this folder at run time.
MNIST_FOLDER = Path(__file__).parents[2] / "shared" / "data" / "mnist"
IMAGES_GZ, LABELS_GZ = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
# Published facts about the MNIST test set (LeCun, Cortes & Burges): labels per class 0..9.
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_SPLIT = 8_000  # the fixed split of shared/data/mnist/README.md: 0-7,999 train, 8,000-9,999 held out

needs_mnist = pytest.mark.skipif(
    not (MNIST_FOLDER / IMAGES_GZ).is_file(), reason=f"the real MNIST test set is not at {MNIST_FOLDER}"
)


@pytest.fixture(scope="module")
def mnist_test():
    return load_mnist(MNIST_FOLDER, split="test")


@pytest.fixture(scope="module")
def mnist_arrays():
    """The raw uint8 arrays, as read_idx returns them."""
    return read_idx(MNIST_FOLDER / IMAGES_GZ), read_idx(MNIST_FOLDER / LABELS_GZ)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory, mnist_arrays):
    """The standard 8,000 / 2,000 split of the real test set, train-* gzipped and t10k-* plain."""
    images, labels = mnist_arrays
    folder = tmp_path_factory.mktemp("mnist_split")
    write_idx(folder / "train-images-idx3-ubyte.gz", images[:TRAIN_SPLIT])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:TRAIN_SPLIT])
    write_idx(folder / "t10k-images-idx3-ubyte", images[TRAIN_SPLIT:])
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[TRAIN_SPLIT:])
    return folder


# --- the real MNIST test set ---------------------------------------------------------------------


@needs_mnist
def test_mnist_test_set_md5_sums_match_the_canonical_files():
    expected = dict(reversed(line.split()) for line in (MNIST_FOLDER / "MD5SUMS").read_text().splitlines() if line.strip())
    for name in (IMAGES_GZ, LABELS_GZ):
        assert hashlib.md5((MNIST_FOLDER / name).read_bytes()).hexdigest() == expected[name], name


@needs_mnist
@pytest.mark.parametrize("name", [IMAGES_GZ, LABELS_GZ])
def test_read_idx_returns_exactly_the_content_of_the_canonical_file(tmp_path, name):
    # Writing back what read_idx returned reproduces the unzipped canonical file byte for byte,
    # so the array is the canonical content (whose .gz the MD5 test checks).
    path = MNIST_FOLDER / name
    write_idx(tmp_path / "rewritten", read_idx(path))
    assert (tmp_path / "rewritten").read_bytes() == gzip.decompress(path.read_bytes())


@needs_mnist
def test_mnist_test_set_has_10000_images_of_28_by_28_in_unit_interval(mnist_test):
    assert mnist_test.images.shape == (10_000, 28, 28) and mnist_test.images.dtype == torch.float32
    assert mnist_test.images.min() == 0.0 and mnist_test.images.max() == 1.0


@needs_mnist
def test_mnist_images_are_bytes_divided_by_255(mnist_test, mnist_arrays):
    assert torch.equal(mnist_test.images * 255, torch.from_numpy(mnist_arrays[0]).float())


@needs_mnist
def test_mnist_test_labels_are_int64_in_0_to_9(mnist_test):
    assert mnist_test.labels.shape == (10_000,) and mnist_test.labels.dtype == torch.int64
    assert set(mnist_test.labels.tolist()) == set(range(10))


@needs_mnist
def test_mnist_first_test_label_is_7(mnist_test):
    assert mnist_test.labels[0].item() == 7


@needs_mnist
def test_mnist_test_label_counts_per_class(mnist_test):
    assert torch.bincount(mnist_test.labels).tolist() == TEST_LABEL_COUNTS


# --- write_idx / read_idx ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["values-idx", "values-idx.gz"])
def test_write_then_read_idx_round_trips(tmp_path, dtype, name):
    array = (np.arange(2 * 3 * 4).reshape(2, 3, 4) * 7 - 20).astype(dtype)
    write_idx(tmp_path / name, array)
    result = read_idx(tmp_path / name)
    assert result.dtype == array.dtype and np.array_equal(result, array)


def test_write_idx_gzips_only_names_ending_in_gz(tmp_path):
    array = np.zeros((3, 2), dtype=np.uint8)
    write_idx(tmp_path / "plain", array)
    write_idx(tmp_path / "packed.gz", array)
    assert (tmp_path / "plain").read_bytes()[:4] == bytes([0, 0, 0x08, 2])
    assert (tmp_path / "packed.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_read_idx_detects_gzip_from_content_not_name(tmp_path):
    array = np.arange(6, dtype=np.uint8)
    write_idx(tmp_path / "packed.gz", array)
    (tmp_path / "packed.gz").rename(tmp_path / "no-suffix")
    write_idx(tmp_path / "plain", array)
    (tmp_path / "plain").rename(tmp_path / "plain.gz")
    assert np.array_equal(read_idx(tmp_path / "no-suffix"), array)
    assert np.array_equal(read_idx(tmp_path / "plain.gz"), array)


def test_read_idx_accepts_the_expected_magic(tmp_path):
    write_idx(tmp_path / "labels", np.arange(10, dtype=np.uint8))
    assert read_idx(tmp_path / "labels", magic=2049).shape == (10,)


# --- the standard split --------------------------------------------------------------------------


@needs_mnist
def test_split_train_holds_the_first_8000_test_images(split_folder, mnist_test):
    train = load_mnist(split_folder, split="train")
    assert torch.equal(train.images, mnist_test.images[:TRAIN_SPLIT])
    assert torch.equal(train.labels, mnist_test.labels[:TRAIN_SPLIT])


@needs_mnist
def test_split_test_holds_the_last_2000_test_images(split_folder, mnist_test):
    held_out = load_mnist(split_folder, split="test")
    assert torch.equal(held_out.images, mnist_test.images[TRAIN_SPLIT:])
    assert torch.equal(held_out.labels, mnist_test.labels[TRAIN_SPLIT:])


# --- bad files: DataError naming the file --------------------------------------------------------


def small_mnist(folder: Path, prefix: str = "train", num_images: int = 3, num_labels: int | None = None, labels=None):
    """A tiny valid MNIST split in ``folder``; returns the (images, labels) paths."""
    folder.mkdir(parents=True, exist_ok=True)
    images_path, labels_path = folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"
    write_idx(images_path, np.full((num_images, 28, 28), 128, dtype=np.uint8))
    if labels is None:
        labels = np.arange(num_images if num_labels is None else num_labels) % 10
    write_idx(labels_path, np.asarray(labels, dtype=np.uint8))
    return images_path, labels_path


def assert_data_error(call, path, *phrases):
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message


def test_wrong_magic_number_is_rejected(tmp_path):
    images_path, labels_path = small_mnist(tmp_path)
    labels_path.write_bytes(images_path.read_bytes())  # images where the labels belong: magic 2051, not 2049
    assert_data_error(lambda: load_mnist(tmp_path), labels_path, "wrong magic number 2051", "expected 2049")


def test_truncated_file_is_rejected(tmp_path):
    images_path, _ = small_mnist(tmp_path)
    images_path.write_bytes(images_path.read_bytes()[:-1])
    assert_data_error(lambda: read_idx(images_path), images_path, "truncated")


def test_truncated_header_is_rejected(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 1]))  # 3 dimensions declared, one size present
    assert_data_error(lambda: read_idx(path), path, "truncated")


def test_negative_size_is_rejected(tmp_path):
    path = tmp_path / "negative"
    path.write_bytes(bytes([0, 0, 0x08, 1, 0xFF, 0xFF, 0xFF, 0xFF]))  # size -1 as a big-endian int32
    assert_data_error(lambda: read_idx(path), path, "negative size")


def test_trailing_bytes_are_rejected(tmp_path):
    images_path, _ = small_mnist(tmp_path)
    images_path.write_bytes(images_path.read_bytes() + b"\x00")
    assert_data_error(lambda: read_idx(images_path), images_path, "1 bytes beyond the end")


def test_truncated_gzip_stream_is_rejected(tmp_path):
    path = tmp_path / "cut.gz"
    write_idx(path, np.arange(1000, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    assert_data_error(lambda: read_idx(path), path, "gzip")


def test_unsupported_type_code_is_rejected(tmp_path):
    path = tmp_path / "odd-type"
    path.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 2, 1, 2]))
    assert_data_error(lambda: read_idx(path), path, "unsupported IDX type code 0x07")


def test_non_mnist_type_code_is_rejected_by_load_mnist(tmp_path):
    images_path, _ = small_mnist(tmp_path)
    write_idx(images_path, np.zeros((3, 28, 28), dtype=np.float32))  # valid IDX (0x0D), but not bytes
    assert_data_error(lambda: load_mnist(tmp_path), images_path, "wrong magic number 3331 (float, 3 dimensions)")


@pytest.mark.parametrize("name", ["garbage", "garbage.gz"])
def test_non_idx_garbage_is_rejected(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>")  # a failed download, saved under the IDX name
    assert_data_error(lambda: read_idx(path), path, "not an IDX file")


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert_data_error(lambda: read_idx(path), path, "not an IDX file")


def test_mismatched_image_and_label_counts_are_rejected(tmp_path):
    images_path, labels_path = small_mnist(tmp_path, num_images=3, num_labels=4)
    assert_data_error(lambda: load_mnist(tmp_path), labels_path, "3 images", "4 labels")


def test_labels_out_of_range_are_rejected(tmp_path):
    _, labels_path = small_mnist(tmp_path, labels=[0, 10, 3])
    assert_data_error(lambda: load_mnist(tmp_path), labels_path, "label 10 at position 1", "outside 0..9")


def test_images_that_are_not_28_by_28_are_rejected(tmp_path):
    images_path, _ = small_mnist(tmp_path)
    write_idx(images_path, np.zeros((3, 32, 32), dtype=np.uint8))
    assert_data_error(lambda: load_mnist(tmp_path), images_path, "expected 28x28 images, got 32x32")


def test_missing_folder_is_rejected(tmp_path):
    assert_data_error(lambda: load_mnist(tmp_path / "nowhere"), tmp_path / "nowhere", "no such folder")


def test_missing_files_name_what_was_looked_for_and_what_is_there(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    assert_data_error(
        lambda: load_mnist(tmp_path), tmp_path, "train-images-idx3-ubyte[.gz]", "train-labels-idx1-ubyte[.gz]", "notes.txt"
    )


def test_missing_labels_file_alone_is_rejected(tmp_path):
    _, labels_path = small_mnist(tmp_path)
    labels_path.unlink()
    assert_data_error(lambda: load_mnist(tmp_path), tmp_path, "train-labels-idx1-ubyte[.gz]", "train-images-idx3-ubyte")


def test_train_split_from_a_test_only_folder_says_so(tmp_path):
    small_mnist(tmp_path, prefix="t10k")
    assert_data_error(lambda: load_mnist(tmp_path, split="train"), tmp_path, "has the test split (t10k-*) but no train split", "split='test'")


def test_missing_single_file_is_rejected(tmp_path):
    assert_data_error(lambda: read_idx(tmp_path / "absent"), tmp_path / "absent", "no such file")


def test_unknown_split_is_rejected(tmp_path):
    with pytest.raises(DataError, match="'train' or 'test'"):
        load_mnist(tmp_path, split="validation")


# --- scikit-learn's 8x8 digits -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_shape_and_dtypes(digits):
    assert digits.images.shape == (1797, 8, 8) and digits.images.dtype == torch.float32
    assert digits.labels.shape == (1797,) and digits.labels.dtype == torch.int64


def test_digits_are_the_16_grey_levels_scaled_to_unit_interval(digits):
    # UCI optical digits: counts of set pixels in 4x4 blocks, 0..16.
    grey_levels = digits.images * 16
    assert torch.equal(grey_levels, grey_levels.round())
    assert digits.images.min() == 0.0 and digits.images.max() == 1.0


def test_digits_labels_cover_0_to_9_about_180_each(digits):
    counts = torch.bincount(digits.labels)
    assert len(counts) == 10 and counts.sum() == 1797 and counts.min() >= 170 and counts.max() <= 190


# --- binarize and check_unit_interval ------------------------------------------------------------


def test_binarize_gives_zeros_and_ones(digits):
    binary = binarize(digits.images, generator=torch.Generator().manual_seed(0))
    assert binary.shape == digits.images.shape and binary.dtype == digits.images.dtype
    assert set(binary.unique().tolist()) <= {0.0, 1.0}


def test_binarize_mean_matches_mean_intensity(digits):
    # Independent Bernoulli(p_i): the mean of the draws has variance sum p_i (1 - p_i) / n^2.
    probabilities = digits.images.double()
    binary = binarize(digits.images, generator=torch.Generator().manual_seed(0)).double()
    standard_error = math.sqrt((probabilities * (1 - probabilities)).sum().item()) / probabilities.numel()
    assert abs(binary.mean().item() - probabilities.mean().item()) < 5 * standard_error  # 5 s.e.: p < 1e-6 by chance


def test_binarize_keeps_zeros_and_ones_fixed():
    images = torch.tensor([0.0, 1.0]).repeat(500)
    assert torch.equal(binarize(images, generator=torch.Generator().manual_seed(0)), images)


def test_binarize_draws_afresh_each_call(digits):
    generator = torch.Generator().manual_seed(0)
    assert not torch.equal(binarize(digits.images, generator=generator), binarize(digits.images, generator=generator))


def test_binarize_is_reproducible_with_a_seeded_generator(digits):
    first = binarize(digits.images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, binarize(digits.images, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan")])
def test_check_unit_interval_rejects_values_outside(bad):
    images = torch.full((2, 3, 3), 0.5)
    images[1, 2, 0] = bad
    with pytest.raises(DataError, match=r"my-images: value .* at index \(1, 2, 0\) is outside \[0, 1\]"):
        check_unit_interval(images, "my-images")


def test_check_unit_interval_rejects_raw_bytes():
    with pytest.raises(DataError, match="my-images: expected floating-point"):
        check_unit_interval(torch.zeros(2, 2, dtype=torch.uint8), "my-images")


def test_check_unit_interval_accepts_the_closed_interval():
    images = torch.tensor([0.0, 0.25, 1.0])
    assert check_unit_interval(images, "x") is images
