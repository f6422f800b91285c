"""Image data: IDX files (MNIST), scikit-learn's 8x8 digits, and dynamic binarization.

Every loader returns float32 images with intensities in [0, 1] and int64
labels, and rejects bad data (missing or truncated file, wrong magic number,
labels out of range) with a :class:`~ppvi.errors.DataError` that names the
file and the problem.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte
big-endian magic number, made of two zero bytes, a type code byte and the
number of dimensions; then one big-endian int32 size per dimension; then the
values, big-endian, in C order. MNIST images have magic 2051 (0x00000803:
unsigned bytes, 3 dimensions) and labels 2049 (0x00000801: unsigned bytes, 1
dimension).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .errors import DataError
from .rundir import atomic_write

__all__ = [
    "ImageSet",
    "read_idx",
    "write_idx",
    "load_mnist",
    "load_digits",
    "binarize",
    "check_unit_interval",
    "flat_image_data",
    "num_pixels",
]

GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> (big-endian numpy dtype, name in the format's description)
IDX_TYPES = {
    0x08: (np.dtype(">u1"), "unsigned byte"),
    0x09: (np.dtype(">i1"), "signed byte"),
    0x0B: (np.dtype(">i2"), "short"),
    0x0C: (np.dtype(">i4"), "int"),
    0x0D: (np.dtype(">f4"), "float"),
    0x0E: (np.dtype(">f8"), "double"),
}

MNIST_IMAGES_MAGIC, MNIST_LABELS_MAGIC = 2051, 2049
MNIST_SIDE, MNIST_CLASSES = 28, 10
MNIST_PREFIXES = {"train": "train", "test": "t10k"}


class ImageSet(NamedTuple):
    """Images and their labels, one per row.

    Attributes
    ----------
    images : Tensor, float32, (num_images, height, width)
        Intensities in [0, 1].
    labels : Tensor, int64, (num_images,)
    """

    images: torch.Tensor
    labels: torch.Tensor


def _describe_magic(magic: int) -> str:
    type_code, num_dims = (magic >> 8) & 0xFF, magic & 0xFF
    type_name = IDX_TYPES[type_code][1] if type_code in IDX_TYPES else f"unknown type code 0x{type_code:02X}"
    return f"{magic} ({type_name}, {num_dims} dimension{'s' if num_dims != 1 else ''})"


# The most an IDX file may declare (header plus data): MNIST's training images are 47 MB, EMNIST's largest 550 MB.
MAX_IDX_BYTES = 2**30
# deflate cannot expand by more than about 1032:1, so a gzip file declaring more than this ratio is cut short (or a bomb)
MAX_GZIP_RATIO = 1100
_CHUNK = 2**22


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file.")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected an IDX file.")


def _read_exactly(stream, size: int, path: Path, gzipped: bool) -> bytes:
    """Up to ``size`` bytes from a (possibly gzip) stream, in bounded chunks: memory never exceeds ``size``."""
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    try:
        while done < size:
            count = stream.readinto(view[done : done + _CHUNK])
            if not count:
                break
            done += count
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
        if not gzipped:
            raise
        raise DataError(f"{path}: corrupt or truncated gzip file ({error}).") from None
    return bytes(view[:done]) if done < size else buffer


def _count_rest(stream, path: Path, gzipped: bool, limit: int = 2**20) -> int:
    """How many bytes are left in the stream (at most ``limit`` + 1 counted, so a bomb is not expanded)."""
    rest = _read_exactly(stream, limit + 1, path, gzipped)
    return len(rest)


def read_idx(path: str | Path, *, magic: int | None = None) -> np.ndarray:
    """Read one IDX file, gzipped or not (detected from the gzip magic bytes, not the name).

    The header is read first and checked against the file's size; the data are then read (or
    decompressed, as a bounded stream) up to the declared length only, so a gzip bomb or a header
    declaring more than :data:`MAX_IDX_BYTES` costs no memory.

    Parameters
    ----------
    path : str or Path
    magic : int, optional
        The magic number the file must have, e.g. 2051 for MNIST images
        (unsigned bytes, 3 dimensions) or 2049 for labels (unsigned bytes, 1
        dimension). Any valid IDX header is accepted when omitted.

    Returns
    -------
    ndarray
        The values in native byte order, shaped by the header's sizes
        (uint8 for type code 0x08).

    Raises
    ------
    DataError
        Not an IDX file, unsupported type code, a magic number other than
        ``magic``, a file length that does not match the header (truncated
        or with trailing bytes), or a declared size beyond what ppvi reads; the
        message names the file.
    """
    path = Path(path)
    _check_file(path)
    file_size = path.stat().st_size
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        shape, dtype, header_length = _read_header(stream, path, gzipped, magic)
        expected_length = header_length + math.prod(shape) * dtype.itemsize
        unzipped = "unzipped " if gzipped else ""
        if expected_length > MAX_IDX_BYTES:
            raise DataError(f"{path}: the IDX header declares shape {shape}, {expected_length} bytes, more than ppvi reads ({MAX_IDX_BYTES} bytes).")
        if gzipped and expected_length > MAX_GZIP_RATIO * file_size + 2**16:
            raise DataError(
                f"{path}: truncated: the header declares shape {shape} ({expected_length} bytes in all), "
                f"more than a {file_size}-byte gzip file can hold."
            )
        if not gzipped and file_size != expected_length:
            content_length = file_size
        else:
            content = _read_exactly(stream, expected_length - header_length, path, gzipped)
            content_length = header_length + len(content)
            if content_length == expected_length:
                content_length += _count_rest(stream, path, gzipped)
        if content_length < expected_length:
            raise DataError(
                f"{path}: truncated: the header declares shape {shape} ({expected_length} bytes in all), "
                f"but the {unzipped}file has {content_length} bytes."
            )
        if content_length > expected_length:
            extra = content_length - expected_length
            count = f"{extra}" if not gzipped or extra <= 2**20 else f"more than {2**20}"
            raise DataError(
                f"{path}: {count} bytes beyond the end of the data that the header "
                f"declares (shape {shape}); not a well-formed IDX file."
            )
    values = np.frombuffer(content, dtype=dtype).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


def _read_header(stream, path: Path, gzipped: bool, magic: int | None) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, header length) from the first bytes of an IDX stream, checked."""
    start = _read_exactly(stream, 4, path, gzipped)
    if not start:
        raise DataError(f"{path}: not an IDX file (the {'unzipped ' if gzipped else ''}file is empty).")
    if len(start) < 4 or start[:2] != b"\x00\x00":
        start = bytes(start) + bytes(_read_exactly(stream, 4, path, gzipped))
        raise DataError(
            f"{path}: not an IDX file ({'unzipped, ' if gzipped else ''}it starts with {start[:8]!r}; "
            "an IDX file starts with two zero bytes, a type code and the number of dimensions)."
        )
    type_code, num_dims = start[2], start[3]
    if type_code not in IDX_TYPES:
        supported = ", ".join(f"0x{code:02X} ({name})" for code, (_, name) in IDX_TYPES.items())
        raise DataError(f"{path}: unsupported IDX type code 0x{type_code:02X}; the format defines {supported}.")
    file_magic = int.from_bytes(start[:4], "big")
    if magic is not None and file_magic != magic:
        raise DataError(f"{path}: wrong magic number {_describe_magic(file_magic)}, expected {_describe_magic(magic)}.")
    if num_dims == 0:
        raise DataError(f"{path}: the IDX header declares 0 dimensions.")
    header_length = 4 + 4 * num_dims
    sizes = _read_exactly(stream, 4 * num_dims, path, gzipped)
    if len(sizes) < 4 * num_dims:
        raise DataError(f"{path}: truncated: {4 + len(sizes)} bytes, shorter than its own {header_length}-byte header.")
    shape = tuple(int(size) for size in np.frombuffer(bytes(sizes), dtype=">i4"))
    if min(shape) < 0:
        raise DataError(f"{path}: the IDX header declares a negative size, shape {shape}.")
    return shape, IDX_TYPES[type_code][0], header_length


def write_idx(path: str | Path, array) -> None:
    """Write an array as an IDX file, gzipped when the name ends in ``.gz``; the inverse of :func:`read_idx`.

    Parameters
    ----------
    path : str or Path
        Written atomically (a temporary name, then renamed into place).
    array : array-like
        Of dtype uint8 (MNIST), int8, int16, int32, float32 or float64, with 1 to 255 dimensions.
    """
    path = Path(path)
    array = np.asarray(array.cpu() if isinstance(array, torch.Tensor) else array)
    type_codes = {dtype.newbyteorder("="): code for code, (dtype, _) in IDX_TYPES.items()}
    if array.dtype not in type_codes:
        raise DataError(f"{path}: cannot write dtype {array.dtype} as IDX; use one of {', '.join(str(t) for t in type_codes)}.")
    if not 1 <= array.ndim <= 255:
        raise DataError(f"{path}: IDX holds 1 to 255 dimensions, got an array of shape {array.shape}.")
    header = bytes([0, 0, type_codes[array.dtype], array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    content = header + np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">")).tobytes()
    if path.name.endswith(".gz"):
        content = gzip.compress(content, compresslevel=6, mtime=0)  # mtime=0: same array, same bytes
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(content))


def _find_idx(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or, failing that, ``folder/stem.gz``."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist(folder: str | Path, split: str = "train") -> ImageSet:
    """Load one split of MNIST (or Fashion-MNIST, KMNIST: same files) from a folder of IDX files.

    Parameters
    ----------
    folder : str or Path
        Holds ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``
        (``split="train"``) or ``t10k-images-idx3-ubyte`` and
        ``t10k-labels-idx1-ubyte`` (``split="test"``), each optionally gzipped
        with a ``.gz`` suffix (the uncompressed file is read when both exist).
    split : {"train", "test"}

    Returns
    -------
    ImageSet
        ``images`` float32 (N, 28, 28) in [0, 1] (the bytes divided by 255),
        ``labels`` int64 (N,) in 0..9.

    Raises
    ------
    DataError
        Missing folder or files (the message lists what was looked for and what
        the folder holds), any :func:`read_idx` problem, images that are not
        28x28, different numbers of images and labels, labels outside 0..9.
    """
    folder = Path(folder)
    if split not in MNIST_PREFIXES:
        raise DataError(f"MNIST split must be 'train' or 'test', got {split!r}.")
    if not folder.exists():
        raise DataError(f"{folder}: no such folder (expected a folder holding the MNIST IDX files).")
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file; expected a folder holding the MNIST IDX files.")
    prefix = MNIST_PREFIXES[split]
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    paths = [_find_idx(folder, stem) for stem in stems]
    if None in paths:
        wanted = " and ".join(f"{stem}[.gz]" for stem in stems)
        contents = sorted(entry.name for entry in folder.iterdir())
        listing = ", ".join(contents[:20]) + (f", ... ({len(contents)} entries)" if len(contents) > 20 else "")
        message = f"{folder}: no MNIST {split} split: looked for {wanted}; the folder holds {listing or 'nothing'}."
        other = "test" if split == "train" else "train"
        if all(_find_idx(folder, stem.replace(prefix, MNIST_PREFIXES[other], 1)) for stem in stems):
            message += f" It has the {other} split ({MNIST_PREFIXES[other]}-*) but no {split} split: load it with split={other!r}"
            if split == "train":
                message += ", or divide it into train-* and t10k-* files with ppvi.images.write_idx"
            message += "."
        raise DataError(message)
    images_path, labels_path = paths
    images = read_idx(images_path, magic=MNIST_IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=MNIST_LABELS_MAGIC)
    if images.shape[1:] != (MNIST_SIDE, MNIST_SIDE):
        raise DataError(f"{images_path}: expected {MNIST_SIDE}x{MNIST_SIDE} images, got {images.shape[1]}x{images.shape[2]}.")
    if images.shape[0] == 0:
        raise DataError(f"{images_path}: holds no images.")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
            "they must match one to one."
        )
    out_of_range = np.flatnonzero(labels >= MNIST_CLASSES)  # uint8: never negative
    if out_of_range.size:
        first = out_of_range[0]
        raise DataError(
            f"{labels_path}: label {labels[first]} at position {first} is outside 0..{MNIST_CLASSES - 1} "
            f"({out_of_range.size} such labels)."
        )
    return ImageSet(
        images=torch.from_numpy(images).to(torch.float32).div_(255.0),
        labels=torch.from_numpy(labels).to(torch.int64),
    )


def load_digits() -> ImageSet:
    """scikit-learn's 8x8 handwritten digits (UCI optical recognition set; shipped with scikit-learn, no download).

    Returns
    -------
    ImageSet
        ``images`` float32 (1797, 8, 8) in [0, 1] (grey levels 0..16 divided by
        16), ``labels`` int64 (1797,) in 0..9.
    """
    from sklearn.datasets import load_digits as sklearn_digits  # scikit-learn imports in ~1 s: only when asked

    digits = sklearn_digits()
    return ImageSet(
        images=torch.as_tensor(digits.images / 16.0, dtype=torch.float32),
        labels=torch.as_tensor(digits.target, dtype=torch.int64),
    )


def flat_image_data(source: str | Path | None) -> dict:
    """A model file's data for an image model with a flat pixel vector per image.

    ``source`` None gives the built-in 8x8 digits, else the MNIST training split in that folder;
    returns ``{"x": (N, H*W) intensities in [0, 1], "labels": (N,)}``.
    """
    images, labels = load_digits() if source is None else load_mnist(source, "train")
    return {"x": images.reshape(images.shape[0], -1), "labels": labels}


def num_pixels(x: torch.Tensor, model: str) -> int:
    """Pixels per data point of an image tensor (N, ...); ValueError naming ``model`` for a vector of scalars."""
    if x.dim() < 2:
        raise ValueError(f"{model} needs images (one row of pixels per data point), got a vector of scalars.")
    return x.shape[1:].numel()


def check_unit_interval(images: torch.Tensor, name: str) -> torch.Tensor:
    """Check that ``images`` is a floating-point tensor with every value in [0, 1] (NaN is not).

    Parameters
    ----------
    images : Tensor
    name : str
        What to call the data in the error message (a file name, ``"--data"``, ...).

    Returns
    -------
    Tensor
        ``images``, unchanged.
    """
    if not torch.is_floating_point(images):
        raise DataError(f"{name}: expected floating-point intensities in [0, 1], got {images.dtype} (divide bytes by 255).")
    inside = (images >= 0) & (images <= 1)  # False for NaN
    if not inside.all():
        position = tuple((~inside).nonzero()[0].tolist())
        raise DataError(
            f"{name}: value {images[position].item()} at index {position} is outside [0, 1] "
            f"({int((~inside).sum())} such values); intensities must lie in [0, 1]."
        )
    return images


def binarize(images: torch.Tensor, *, generator: torch.Generator | None = None, check: bool = True) -> torch.Tensor:
    """Dynamic binarization: one Bernoulli draw per pixel, with the intensity as its probability.

    A fresh draw each time it is called (e.g. each minibatch), the usual data
    for Bernoulli-likelihood VAEs on MNIST (Salakhutdinov & Murray 2008).

    Parameters
    ----------
    images : Tensor
        Intensities in [0, 1] (checked).
    generator : torch.Generator, optional
        Source of the draws, for reproducibility.
    check : bool
        Check the range first. Inside a training step pass ``check=False`` after checking the
        data set once: the check reads values back to the host, a GPU sync every step.

    Returns
    -------
    Tensor
        Zeros and ones, same shape and dtype as ``images``.

    References
    ----------
    Salakhutdinov, R. and Murray, I. (2008). On the quantitative analysis of deep belief networks. ICML.
    """
    if check:
        check_unit_interval(images, "images")
    return torch.bernoulli(images, generator=generator)
