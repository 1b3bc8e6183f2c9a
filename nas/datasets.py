"""mnist, fashion_mnist and cifar10 read from local copies: found, read and checked.

Each is looked for, in this order, in the pipeline's `data.path` (a folder), in Keras's
cache (where `keras.datasets` keeps what it downloads: `$KERAS_HOME/datasets/...`,
default `~/.keras`) and in the folders Debian's dataset packages install
(`SYSTEM_FOLDERS`); the first place that holds every file is read. Nothing is
downloaded: a search's input is checked without the network and without writing to
Keras's cache, and a machine without one fails at once instead of waiting on it. When no
place holds the files, `DataError` names every place it looked and how to get the files
(the Debian package, or `keras.datasets.<source>.load_data()` once, online, which fills
Keras's cache).

The formats, as their authors publish them:

- mnist and fashion_mnist: the four IDX files (`train-images-idx3-ubyte.gz`,
  `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`,
  gzipped or plain): a big-endian header (magic number 0x00000803 for images, 0x00000801
  for labels, then each dimension) and the bytes. Keras caches mnist as `mnist.npz`
  instead (`x_train`, `y_train`, `x_test`, `y_test`).
- cifar10: the extracted `cifar-10-batches-py` folder, its pickled batches
  `data_batch_1` .. `data_batch_5` and `test_batch` (each a dict of `data`, rows of 3,072
  bytes: 32x32 red, then green, then blue, and `labels`), unpickled as Keras does
  (`encoding="bytes"`, numpy's arrays and nothing else).

A file that is not what it claims (a wrong magic number, a truncated gzip or fewer bytes
than its header's dimensions, images and labels that do not pair up, a label outside 0-9)
is refused in one line naming it. The images are uint8, height x width x channels; the
official test split comes back as the test data.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from nas.errors import DataError

__all__ = ["CLASS_NAMES", "IDX_FILES", "CIFAR10_FILES", "KERAS_CACHE", "SYSTEM_FOLDERS",
           "PACKAGES", "load"]

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")  # each also found with `.gz` (looked for first)
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch")
# Where keras.datasets keeps each dataset under $KERAS_HOME, as of Keras 3.15: a folder of
# the files above, or mnist's one npz; cifar10's extracted archive where Keras 3.15 puts it,
# then where Keras 2 and early Keras 3 put it.
KERAS_CACHE = {
    "mnist": ("datasets/mnist.npz",),
    "fashion_mnist": ("datasets/fashion-mnist",),
    "cifar10": ("datasets/cifar-10-batches-py-target/cifar-10-batches-py",
                "datasets/cifar-10-batches-py"),
}
# Folders Debian's dataset packages install the files in, and the package of each source
# (`apt-cache search` finds dataset-fashion-mnist only: none for mnist nor cifar10).
SYSTEM_FOLDERS = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}
PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}
CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                "ship", "truck"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 and 1 dimensions
_IDX_IMAGE_SIZE = (28, 28)  # mnist's and fashion_mnist's (`nas.space` knows them so)
_CIFAR_IMAGE = (3, 32, 32)  # a row of a batch's `data`: channels first
# What unpickling a CIFAR batch may build, as Keras allows it: numpy arrays (numpy 1's and
# 2's spellings), nothing else, so a tampered file cannot run code.
_PICKLE_GLOBALS = frozenset({("numpy", "ndarray"), ("numpy", "dtype"),
                             ("numpy.core.multiarray", "_reconstruct"),
                             ("numpy._core.multiarray", "_reconstruct")})


def load(source: str, path: str | None, where: str):
    """((x_train, y_train), (x_test, y_test)) of `source` from the first place holding it.

    Args:
        source: "mnist", "fashion_mnist" or "cifar10".
        path: the pipeline's `data.path` (a folder), looked in first; None when not given.
        where: what messages start with (the pipeline file and `data`).

    Raises:
        DataError: no place holds the files, or a file is not what it claims.
    """
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{where}.path: {path} is a file; for {source!r} it names a folder "
                        f"holding {_what(source)}")
    looked = []
    for field, kind, place in _places(source, path):
        files = _files(kind, place)
        if all(files):
            return _READERS[kind](files, f"{where}.{field}")
        held = sum(1 for file in files if file)
        looked.append(_shown(place) + (f" ({held} of the {len(files)} files)" if held else ""))
    raise DataError(f"{where}.source: {source!r} not found offline; looked in "
                    f"{', '.join(looked)}; {_remedy(source, path)}")


def _places(source: str, path: str | None) -> list[tuple[str, str, str]]:
    """(field named in errors, kind: "idx", "npz" or "cifar", path) of each place, in
    the order they are looked in."""
    kind = "cifar" if source == "cifar10" else "idx"
    places = [("path", kind, path)] if path is not None else []
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    places += [("source", "npz" if cached.endswith(".npz") else kind,
                os.path.join(home, cached)) for cached in KERAS_CACHE[source]]
    places += [("source", kind, folder) for folder in SYSTEM_FOLDERS.get(source, ())]
    return places


def _files(kind: str, place: str) -> list[str | None]:
    """Each file a place of this `kind` must hold, in the order its reader takes them: its
    path, or None where it is missing (an IDX file found gzipped, else plain)."""
    if kind == "npz":
        return [place if os.path.isfile(place) else None]
    files = []
    for name in IDX_FILES if kind == "idx" else CIFAR10_FILES:
        candidates = [os.path.join(place, name)]
        if kind == "idx":
            candidates.insert(0, candidates[0] + ".gz")
        files.append(next((file for file in candidates if os.path.isfile(file)), None))
    return files


def _shown(path: str) -> str:
    """`path` with the home folder as ~, as the user knows it."""
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if path.startswith(home + os.sep) else path


def _what(source: str) -> str:
    if source == "cifar10":
        return "the extracted cifar-10-batches-py files (data_batch_1..5, test_batch)"
    return "the four *-ubyte.gz files"


def _remedy(source: str, path: str | None) -> str:
    """How to get `source`'s files, for the not-found message."""
    package = PACKAGES.get(source)
    if package:
        remedy = (f"install Debian's {package} (apt-get install {package}) or put "
                  f"{_what(source)} in one of them")
    elif source == "cifar10":
        remedy = f"set data.path to the folder of {_what(source)}"
    else:
        remedy = f"put {_what(source)} in {'data.path' if path else 'a folder named by data.path'}"
    return (f"{remedy}, or run keras.datasets.{source}.load_data() once online (it fills "
            f"Keras's cache)")


# --- IDX: mnist, fashion_mnist ----------------------------------------------------------


def _idx(files: list[str], where: str):
    train_images, train_labels, test_images, test_labels = files
    train = _paired(_idx_array(train_images, _IMAGES_MAGIC, where), train_images,
                    _idx_array(train_labels, _LABELS_MAGIC, where), train_labels, where)
    test = _paired(_idx_array(test_images, _IMAGES_MAGIC, where), test_images,
                   _idx_array(test_labels, _LABELS_MAGIC, where), test_labels, where)
    return train, test


def _idx_array(file: str, magic: int, where: str) -> np.ndarray:
    """The array an IDX file holds (images: (n, 28, 28) uint8; labels: (n,) uint8).

    Raises:
        DataError: the file is not a readable gzip, not an IDX file of this kind, or holds
            fewer or more bytes than its header's dimensions need.
    """
    data = Path(file).read_bytes()
    if file.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise DataError(f"{where}: {file}: a truncated gzip file (it ends before its "
                            f"end-of-stream marker)") from None
        except (OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{where}: {file}: not a readable gzip file ({error})") from None
    kind = "images" if magic == _IMAGES_MAGIC else "labels"
    if len(data) < 4 or struct.unpack_from(">I", data)[0] != magic:
        found = f"{struct.unpack_from('>I', data)[0]:#010x}" if len(data) >= 4 else "none"
        raise DataError(f"{where}: {file}: IDX magic number {found}, not an IDX {kind} "
                        f"file's ({magic:#010x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: {file}: a truncated IDX {kind} file ({len(data)} bytes, "
                        f"its header alone takes {header})")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    needed = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != needed:
        described = (f"{shape[0]:,} images of {shape[1]}x{shape[2]}" if ndim == 3
                     else f"{shape[0]:,} labels")
        state = "a truncated" if len(data) - header < needed else "an overlong"
        raise DataError(f"{where}: {file}: {state} IDX {kind} file (its header says "
                        f"{described}, {needed:,} bytes; it holds {len(data) - header:,})")
    if ndim == 3 and shape[1:] != _IDX_IMAGE_SIZE:
        raise DataError(f"{where}: {file}: images of {shape[1]}x{shape[2]}; mnist's and "
                        f"fashion_mnist's are 28x28")
    return np.frombuffer(data, np.uint8, count=needed, offset=header).reshape(shape)


def _mnist_npz(files: list[str], where: str):
    """Keras's cached mnist.npz."""
    (file,) = files
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("x_train", "y_train", "x_test", "y_test")
                      if key in npz.files}
    except (OSError, ValueError, EOFError, zlib.error) as error:
        raise DataError(f"{where}: {file}: not a readable .npz file ({error})") from None
    missing = [key for key in ("x_train", "y_train", "x_test", "y_test") if key not in arrays]
    if missing:
        raise DataError(f"{where}: {file}: no {', '.join(missing)} array (keras.datasets' "
                        f"mnist.npz holds x_train, y_train, x_test, y_test)")
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != _IDX_IMAGE_SIZE:
            raise DataError(f"{where}: {file}: {key} is {x.dtype} {x.shape}, not mnist's "
                            f"uint8 (n, 28, 28)")
    return tuple(_paired(arrays[f"x_{split}"], f"{file} (x_{split})", arrays[f"y_{split}"],
                         f"{file} (y_{split})", where) for split in ("train", "test"))


# --- cifar10 ----------------------------------------------------------------------------


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it would build {module}.{name}, which a CIFAR-10 "
                                     f"batch does not hold")


def _cifar(files: list[str], where: str):
    batches = [_cifar_batch(file, where) for file in files]
    train = (np.concatenate([x for x, _ in batches[:-1]]),
             np.concatenate([y for _, y in batches[:-1]]))
    return train, batches[-1]


def _cifar_batch(file: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch: (images (n, 32, 32, 3) uint8, labels (n,) integers)."""
    try:
        with open(file, "rb") as stream:
            batch = _ArraysOnly(stream, encoding="bytes").load()
    except Exception as error:  # what a broken pickle raises: EOFError, UnpicklingError, ...
        reason = str(error) or error.__class__.__name__
        raise DataError(f"{where}: {file}: not a CIFAR-10 batch ({reason})") from None
    if not (isinstance(batch, dict) and b"data" in batch and b"labels" in batch):
        raise DataError(f"{where}: {file}: not a CIFAR-10 batch (no data and labels in it)")
    x, labels = batch[b"data"], batch[b"labels"]
    size = int(np.prod(_CIFAR_IMAGE))
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2
            and x.shape[1] == size):
        shown = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{where}: {file}: its data is {shown}, not rows of {size:,} bytes "
                        f"(32x32x3 uint8)")
    try:
        y = np.asarray(labels).reshape(-1)  # a list of ints; `_paired` checks them
    except ValueError:  # a ragged list
        raise DataError(f"{where}: {file}: its labels are not a list of integers") from None
    x = x.reshape(-1, *_CIFAR_IMAGE).transpose(0, 2, 3, 1)  # height, width, channels
    return _paired(x, f"{file} (data)", y, f"{file} (labels)", where)


# --- both -------------------------------------------------------------------------------


def _paired(x: np.ndarray, x_file: str, y: np.ndarray, y_file: str, where: str):
    """(x, y) once they pair up: as many labels as images, each label in 0-9."""
    if len(x) != len(y):
        raise DataError(f"{where}: {x_file} holds {len(x):,} images but {y_file} holds "
                        f"{len(y):,} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: {y_file}: labels of dtype {y.dtype}, not integers")
    bad = np.flatnonzero((y < 0) | (y > 9))
    if bad.size:
        raise DataError(f"{where}: {y_file}: label {int(y[bad[0]])} (sample {bad[0]:,}; "
                        f"{bad.size:,} such) is not one of 0 to 9")
    return x, y


_READERS = {"idx": _idx, "npz": _mnist_npz, "cifar": _cifar}  # a place's kind -> its reader
