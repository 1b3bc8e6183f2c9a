"""`Pipeline` -> tf.data datasets, the input shape and the class names.

Loading happens in two steps so that bad data is refused before anything is written:
`load_arrays` reads and checks the data (raising `DataError`) and splits it into
training, validation and test data, and `make_datasets` turns the training and
validation data into shuffled, batched, prefetched `tf.data` pipelines, once per search.
The test data never reaches a `Datasets`: the search cannot read it; the final model is
scored on it once, after the search (`test_dataset`).

The bundled digits, mnist, fashion_mnist and cifar10 (found on this machine and read
by `nas.datasets`, never downloaded) and npz files are arrays in memory. A
`directory` source is listed once (its files checked from their headers, in parallel)
and streamed: each file is read, decoded and resized inside `tf.data`, in parallel,
cached in memory only when the decoded images fit `MEMORY_CACHE_BYTES` (see
`ImageFiles`), so memory does not grow with the number of images.

Splits are stratified by class and seeded by `data.seed`, by sample; a directory's by
file, each ranked by a seeded hash of its path in the folder, so that a file's side does
not depend on the listing order nor on its neighbours (adding or removing a file moves at
most one other file across each boundary), and a search resumes only on the same files
(`Arrays.data_digest`). The test share is carved out first (`data.test_split` of all the
data, unless the data holds a test set of its own: the official test split of mnist,
fashion_mnist and cifar10, or an npz's `x_test`), then the validation share
(`data.validation_split` of all the data, or of the training data when the test set is
the data's own). The images stay raw (pixel values as stored); the model rescales them
itself, so an exported model takes images exactly as the pipeline reads them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from nas import datasets
from nas.errors import DataError  # raised here, and by nas.datasets
from nas.specs import DATASETS, Pipeline

__all__ = ["Arrays", "Datasets", "ImageFiles", "class_folders", "images",
           "load_arrays", "make_datasets", "refit_dataset", "test_dataset", "training_share"]

IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP")  # what a `directory` source reads
# `cache: auto` keeps a directory's decoded images in memory up to this many bytes (uint8,
# after resizing: 10,000 RGB images of 64x64), else reads them from disk every epoch.
MEMORY_CACHE_BYTES = 128 * 2**20
BAD_IMAGES_SHOWN = 3  # unreadable files named in the refusal
HEADER_CHUNK = 256  # files one task checks: not a task (a future) per file, for millions
# A BMP's compression field, as its specification names them: TensorFlow reads only
# uncompressed pixels (0), and 32-bit ones with its own bit masks (3, `_bmp_problem`).
_BMP_COMPRESSIONS = {1: "RLE8", 2: "RLE4", 3: "BITFIELDS", 4: "JPEG", 5: "PNG",
                     6: "ALPHABITFIELDS"}
_BMP_BGR_MASKS = (0x00FF0000, 0x0000FF00, 0x000000FF)  # red, green, blue: TensorFlow's order


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """How the files of a `directory` source become images, inside `tf.data`.

    Each file is read, decoded (PNG, JPEG, GIF's first frame, BMP; any mode, as RGB, then
    gray for `channels` 1) and resized to `image_size` in parallel, as uint8. `cache`:
    "memory" keeps a dataset's decoded images (the training data's, apart from them the
    validation data's) in memory after the first epoch, "none" reads them from disk every
    epoch, "auto" keeps them when they take at most `MEMORY_CACHE_BYTES`.
    """

    image_size: tuple[int, int]
    channels: int
    cache: str = "auto"
    skipped: tuple[str, ...] = ()  # unreadable files left out (--skip-bad-images)
    digest: str = ""  # of the kept files' paths in the folder, sorted (`Arrays.data_digest`)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.channels)

    def in_memory(self, count: int) -> bool:
        """Whether `count` decoded images are cached in memory."""
        if self.cache == "auto":
            return count * int(np.prod(self.shape)) <= MEMORY_CACHE_BYTES
        return self.cache == "memory"

    def read(self, path, label):
        """One file's image (a `tf.data` map function)."""
        import tensorflow as tf

        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        if self.channels == 1:  # GIF and BMP decode to RGB only
            image = tf.image.rgb_to_grayscale(image)
        image = tf.image.resize(image, self.image_size, antialias=True)
        return tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8), label


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A pipeline's data, split into training, validation and test data.

    The images are in memory, or, for a `directory` source (`files` set), the `x_*`
    arrays hold the images' file paths and `files` says how to read them.
    `x_test`/`y_test` hold no samples when the pipeline turns the test split off.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: tuple[str, ...]
    pixel_scale: float
    x_test: np.ndarray
    y_test: np.ndarray
    test_source: str = "none"  # "split" (carved out here), "own" (the data's) or "none"
    files: ImageFiles | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if self.files is not None:
            return self.files.shape
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def data_digest(self) -> str:
        """A digest of a `directory` source's kept files ("" for data in memory): the same
        files split the same way, so a search resumes only on the same digest."""
        return self.files.digest if self.files is not None else ""

    @property
    def samples(self) -> int:
        """Training, validation and test samples together (a directory's kept files)."""
        return len(self.y_train) + len(self.y_val) + len(self.y_test)


@dataclasses.dataclass(frozen=True)
class Datasets:
    """Batched, prefetched training and validation datasets (never the test data); cached
    in memory when they are arrays, or a directory's images that fit (`ImageFiles`).

    `share(fraction)` is the training data of a cheap look (`nas.funnel`): a stratified
    `fraction` of the training split (`training_share`), made once per fraction.
    """

    train: object
    validation: object
    share: Callable[[float], object] | None = None


def load_arrays(pipeline: Pipeline, skip_bad_images: bool = False) -> Arrays:
    """Read the pipeline's data into memory (a `directory`'s file list only) and check it.

    A `directory` source's files are all checked, in parallel and from their headers: an
    unreadable one is refused, or left out with `skip_bad_images`.

    Raises:
        DataError: the data is missing (never downloaded: `nas.datasets`) or malformed.
    """
    where = f"{pipeline.source_file}: data"
    source = pipeline.data_source
    x_val = y_val = x_test = y_test = class_names = files = None
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.images.astype("float32"), digits.target.astype("int64")
        class_names, default_scale = [str(c) for c in digits.target_names], 16.0
    elif source in DATASETS:
        (x, y), (x_test, y_test) = datasets.load(source, pipeline.path, where)
        class_names, default_scale = list(datasets.CLASS_NAMES[source]), 255.0
    elif source == "npz":
        x, y, x_val, y_val, x_test, y_test, class_names = _npz(pipeline.path, where)
        default_scale = 255.0 if x.dtype == np.uint8 else max(float(np.max(x)), 1.0)
    else:
        x, y, class_names, skipped, digest = _directory(pipeline, where, skip_bad_images)
        default_scale = 255.0
        files = ImageFiles(pipeline.image_size, 1 if pipeline.color_mode == "grayscale" else 3,
                           pipeline.cache, skipped, digest)

    if files is None:
        x = _as_images(x, f"{where}.x_train")
    y = _labels(y)
    if x_val is not None:
        x_val, y_val = _as_images(x_val, f"{where}.x_val"), _labels(y_val)
    if x_test is not None:
        x_test, y_test = _as_images(x_test, f"{where}.x_test"), _labels(y_test)
    for name, other in (("x_val", x_val), ("x_test", x_test)):
        if other is not None and other.shape[1:] != x.shape[1:]:
            raise DataError(f"{where}: {name} images are {other.shape[1:]}, x_train images "
                            f"are {x.shape[1:]}")
    labelled = [labels for labels in (y, y_val, y_test) if labels is not None]
    num_classes = int(max(labels.max() for labels in labelled if len(labels))) + 1
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]
    if (min(labels.min() for labels in labelled if len(labels)) < 0
            or num_classes > len(class_names)):
        raise DataError(f"{where}: labels must be integers from 0 to {len(class_names) - 1}")
    if len(np.unique(y)) < 2:
        raise DataError(f"{where}: the training data holds only one class")

    rng = np.random.default_rng(pipeline.seed)
    # A directory's files come in the order of their seeded hashes (`_directory`): the test
    # data takes each class's first, the validation data its last.
    ranked = files is not None
    test_source, test_split = "own", pipeline.test_split
    if x_test is not None:
        if test_split:
            raise DataError(f"{where}.test_split: the {source} data holds a test set of its "
                            f"own, which is the test set; leave test_split out (or 0 to "
                            f"score on no test data)")
        if test_split == 0:
            x_test, y_test, test_source = x[:0], y[:0], "none"
    else:
        test_split = 0.2 if test_split is None else test_split
        test_source = "split" if test_split > 0 else "none"
        if x_val is None and pipeline.validation_split + test_split >= 1:
            raise DataError(f"{where}.validation_split: {pipeline.validation_split} with "
                            f"test_split {test_split} leaves no training data (their sum "
                            f"must be below 1)")
        x, y, x_test, y_test = _split(x, y, test_split, rng, class_names, where, "test_split",
                                      "first" if ranked else None)
    if x_val is None:
        if pipeline.validation_split <= 0:
            raise DataError(f"{where}.validation_split: must be above 0 when the data has no "
                            f"validation arrays")
        # A share of all the data: of what the test split left, when it was carved here.
        share = pipeline.validation_split / (1 - (test_split if test_source == "split" else 0))
        x, y, x_val, y_val = _split(x, y, share, rng, class_names, where, "validation_split",
                                    "last" if ranked else None)
    return Arrays(x, y, x_val, y_val, tuple(class_names),
                  float(pipeline.pixel_scale or default_scale), x_test, y_test, test_source,
                  files)


def _labels(y) -> np.ndarray:
    return np.asarray(y).reshape(-1).astype("int64")


def _split(x, y, share: float, rng, class_names, where: str, field: str,
           ranked: str | None = None):
    """`share` of each class drawn from (`x`, `y`): (rest x, rest y, drawn x, drawn y).

    Data in memory is drawn at random (`rng`) and both sides are shuffled. Ranked data (a
    directory's files, in the order of their seeded hashes) gives each class's `ranked`
    "first" or "last" samples, and both sides keep their order: a file's side depends only
    on its rank among its class's files.

    Raises:
        DataError: a class has too few samples to appear on both sides.
    """
    if share <= 0:
        return x, y, x[:0], y[:0]
    drawn = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        if ranked is None:
            members = rng.permutation(members)
        elif ranked == "last":
            members = members[::-1]
        count = max(1, int(round(len(members) * share)))
        if count >= len(members):
            raise DataError(f"{where}.{field}: class {class_names[label]!r} has "
                            f"{len(members)} sample(s) left, too few to appear in the "
                            f"training data and in this split; give it more images or "
                            f"lower the split")
        drawn.append(members[:count])
    picked = np.zeros(len(y), dtype=bool)
    picked[np.concatenate(drawn)] = True
    rest, chosen = np.flatnonzero(~picked), np.flatnonzero(picked)
    if ranked is None:  # shuffled, so that no split is ordered by class (ranks are not)
        rest, chosen = rng.permutation(rest), rng.permutation(chosen)
    return x[rest], y[rest], x[chosen], y[chosen]


def make_datasets(arrays: Arrays, batch_size: int, seed: int = 0) -> Datasets:
    """Shuffled (training), batched and prefetched `tf.data` pipelines over `arrays`."""

    @functools.cache
    def share(fraction: float):
        if fraction >= 1:
            return train
        picked = training_share(arrays, fraction)
        return _pipeline(arrays, arrays.x_train[picked], arrays.y_train[picked], batch_size,
                         seed, shuffle=True)

    train = _pipeline(arrays, arrays.x_train, arrays.y_train, batch_size, seed, shuffle=True)
    return Datasets(
        train=train,
        validation=_pipeline(arrays, arrays.x_val, arrays.y_val, batch_size, seed,
                             shuffle=False),
        share=share,
    )


def training_share(arrays: Arrays, fraction: float) -> np.ndarray:
    """The indices, into the training split, of a stratified `fraction` of it: each class's
    first `fraction` of its samples (at least one) in the split's order, which is already
    shuffled (seeded) or ranked by a seeded hash (a directory's). Never the validation or
    the test data; a larger fraction holds every sample of a smaller one."""
    picked = []
    for label in np.unique(arrays.y_train):
        members = np.flatnonzero(arrays.y_train == label)
        picked.append(members[:max(1, int(round(len(members) * fraction)))])
    return np.sort(np.concatenate(picked))


def refit_dataset(arrays: Arrays, batch_size: int, seed: int = 0):
    """The training and validation data together, shuffled like the training data: what
    `--refit` retrains the final model on (never the test data)."""
    return _pipeline(arrays, np.concatenate([arrays.x_train, arrays.x_val]),
                     np.concatenate([arrays.y_train, arrays.y_val]), batch_size, seed,
                     shuffle=True)


def test_dataset(arrays: Arrays, batch_size: int):
    """The held-out test data, batched (None when there is none): read once, for the final
    model's score."""
    if not len(arrays.y_test):
        return None
    return _pipeline(arrays, arrays.x_test, arrays.y_test, batch_size, 0, shuffle=False,
                     cache=False)


def images(arrays: Arrays, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's images (float32, raw pixel values, as a model receives them) and labels,
    as numpy arrays: `split` is "train", "val" or "test".

    For code that trains outside `tf.data` (the benchmarks' KerasTuner and scikit-learn
    baselines). A directory's files are decoded and resized as `ImageFiles.read` does
    them, all of the split's at once in memory: for data that fits there.
    """
    x, y = getattr(arrays, f"x_{split}"), getattr(arrays, f"y_{split}")
    if arrays.files is None:
        return x, y
    batches = [(images.numpy(), labels.numpy()) for images, labels in
               _pipeline(arrays, x, y, 256, 0, shuffle=False, cache=False)]
    if not batches:
        return np.zeros((0, *arrays.input_shape), "float32"), y
    return (np.concatenate([images for images, _ in batches]),
            np.concatenate([labels for _, labels in batches]))


def _pipeline(arrays: Arrays, x, y, batch_size: int, seed: int, shuffle: bool,
              cache: bool = True):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    files = arrays.files
    if files is None:  # in memory already
        ds = ds.cache() if cache else ds
    elif cache and files.in_memory(len(x)):
        ds = ds.map(files.read, num_parallel_calls=tf.data.AUTOTUNE).cache()
    else:  # shuffled as paths, then read: memory does not grow with the number of images
        if shuffle:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            shuffle = False
        ds = ds.map(files.read, num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if files is not None:  # the images stay raw pixel values, as float32 like the arrays'
        ds = ds.map(lambda images, labels: (tf.cast(images, tf.float32), labels),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _as_images(x, field: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"{field}: shape {x.shape} is not (n, height, width[, channels])")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{field}: dtype {x.dtype} is not numeric")
    return x.astype("float32")


def _npz(path: str, where: str):
    if not os.path.isfile(path):
        raise DataError(f"{where}.path: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise DataError(f"{where}.path: {path} is not a readable .npz file ({error})") from None
    missing = [key for key in ("x_train", "y_train") if key not in arrays]
    if missing:
        raise DataError(f"{where}.path: {path} has no {' or '.join(missing)} array "
                        f"(it holds {sorted(arrays)})")
    for x_key, y_key in (("x_val", "y_val"), ("x_test", "y_test")):
        if (x_key in arrays) != (y_key in arrays):
            raise DataError(f"{where}.path: {path} must hold both {x_key} and {y_key}, or "
                            f"neither")
    for x_key, y_key in (("x_train", "y_train"), ("x_val", "y_val"), ("x_test", "y_test")):
        if x_key in arrays and len(arrays[x_key]) != len(arrays[y_key]):
            raise DataError(f"{where}.path: {path}: {x_key} has {len(arrays[x_key])} samples "
                            f"but {y_key} has {len(arrays[y_key])}")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    return (arrays["x_train"], arrays["y_train"], arrays.get("x_val"), arrays.get("y_val"),
            arrays.get("x_test"), arrays.get("y_test"), names)


def class_folders(pipeline: Pipeline) -> list[str]:
    """The class names of a `directory` source: its sub-folders, sorted.

    Raises:
        DataError: the folder is missing, or holds fewer than two class folders.
    """
    where = f"{pipeline.source_file}: data.path"
    root = Path(pipeline.path)
    if not root.is_dir():
        raise DataError(f"{where}: {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{where}: {root} holds no class folders (one sub-folder per class)")
    if len(classes) < 2:
        raise DataError(f"{where}: {root} holds only one class folder ({classes[0]}); "
                        f"a classifier needs two or more")
    return classes


def _directory(pipeline: Pipeline, where: str, skip_bad_images: bool):
    """A directory's image files and their labels, in the order of their seeded hashes
    (`_split`), the class names, the files left out as unreadable and the digest of the
    kept files' paths in the folder (`Arrays.data_digest`)."""
    root = Path(pipeline.path)
    classes = class_folders(pipeline)
    paths, names, labels = [], [], []  # names: "class/file", as in any copy of the folder
    for label, name in enumerate(classes):
        with os.scandir(root / name) as entries:
            found = sorted((entry.name, entry.path) for entry in entries
                           if not entry.name.startswith(".") and entry.is_file())
        paths.extend(path for _, path in found)
        names.extend(f"{name}/{file}" for file, _ in found)
        labels.extend([label] * len(found))
    if not paths:
        raise DataError(f"{where}.path: {root} holds no images (PNG, JPEG, GIF or BMP)")

    def check(start: int) -> list[str | None]:
        return [_unreadable(path) for path in paths[start:start + HEADER_CHUNK]]

    with concurrent.futures.ThreadPoolExecutor(min(32, 4 * (os.cpu_count() or 1))) as pool:
        problems = [why for chunk in pool.map(check, range(0, len(paths), HEADER_CHUNK))
                    for why in chunk]
    bad = [(path, why) for path, why in zip(paths, problems) if why]
    if bad and not skip_bad_images:
        shown = "; ".join(f"{os.path.relpath(path, root)} ({why})"
                          for path, why in bad[:BAD_IMAGES_SHOWN])
        more = f" and {len(bad) - BAD_IMAGES_SHOWN} more" if len(bad) > BAD_IMAGES_SHOWN else ""
        raise DataError(f"{where}.path: {len(bad):,} of {len(paths):,} files are not readable "
                        f"images: {shown}{more}; fix or remove them, or pass "
                        f"`skip_bad_images` to leave them out")
    kept = [i for i, why in enumerate(problems) if not why]
    files = np.bincount(labels, minlength=len(classes))
    readable = np.bincount([labels[i] for i in kept], minlength=len(classes))
    for label in np.flatnonzero(readable == 0):  # a class the classifier would never see
        left_out = (f" (its {files[label]:,} file(s) are not readable images)"
                    if files[label] else "")
        raise DataError(f"{where}.path: class folder {classes[label]!r} holds no readable "
                        f"images{left_out}; add images to it, or remove it")
    digest = hashlib.sha256("\0".join(sorted(names[i] for i in kept)).encode())
    rank = {i: hashlib.sha256(f"{pipeline.seed}\0{names[i]}".encode()).digest() for i in kept}
    kept.sort(key=rank.__getitem__)
    return (np.array([paths[i] for i in kept]),
            np.array([labels[i] for i in kept], dtype="int64"), classes,
            tuple(path for path, _ in bad), digest.hexdigest()[:16])


def _unreadable(path: str) -> str | None:
    """Why the file at `path` is not an image `ImageFiles.read` decodes, or None.

    Reads what identifies the image and its structure (PIL's `verify`: PNG chunks and
    their checksums, GIF and BMP headers), a JPEG's end marker and what of a BMP's header
    TensorFlow's decoder relies on (`_bmp_problem`), not its pixels.
    """
    from PIL import Image, UnidentifiedImageError

    kind = "image"  # until the header names it
    try:
        with Image.open(path) as image:
            kind, mode = image.format, image.mode
            kind = "JPEG" if kind == "MPO" else kind  # a phone's multi-picture JPEG
            if kind not in IMAGE_FORMATS:
                return f"{kind} is not PNG, JPEG, GIF or BMP"
            problem = _bmp_problem(path, mode) if kind == "BMP" else None
            if problem:
                return problem
            image.verify()
        if kind == "JPEG":  # its scan data ends with an end marker (a video may follow)
            data = Path(path).read_bytes()
            if data.rfind(b"\xff\xd9") < data.find(b"\xff\xda"):
                return "a truncated JPEG"
    except UnidentifiedImageError:
        return "not an image" if os.path.getsize(path) else "an empty file"
    except Exception as error:  # PIL's errors for broken files: OSError, EOFError, ...
        return f"broken {kind}: {error}" if kind != "image" else f"broken: {error}"
    return None


def _bmp_problem(path: str, mode: str) -> str | None:
    """Why TensorFlow's BMP decoder fails on, or misreads, the BMP at `path` (PIL's `mode`),
    or None.

    As measured with TensorFlow 2.21's `decode_image` on the files PIL writes and on
    hand-made ones: it reads a 40-byte or longer header's 8-bit (as gray: it ignores a
    palette), 24- and 32-bit images, uncompressed, or 32-bit with bit masks in its own
    order (blue, green, red), from a file exactly as long as the pixel data needs (rows
    padded to 4 bytes; more bytes after them are refused too). It fails on 1-, 4- and
    16-bit images, OS/2 headers and RLE compression (or decodes garbage), and reads a
    colour palette or other bit masks as wrong colours.
    """
    with open(path, "rb") as file:
        header = file.read(66)  # up to the bit masks of a 32-bit BITFIELDS image
    (start,) = struct.unpack_from("<I", header, 10)
    header_size, width, height, _, bits, compression = struct.unpack_from("<IiiHHI", header, 14)
    if header_size < 40:
        return f"an OS/2 BMP ({header_size}-byte header), which TensorFlow does not decode"
    if bits not in (8, 24, 32):
        return (f"a {bits}-bit BMP, which TensorFlow does not decode (only 8-bit gray, 24- "
                f"and 32-bit)")
    if mode in ("1", "P"):  # PIL's modes for a palette that is not the 256 grays in order
        return "a colour-palette BMP, whose palette TensorFlow ignores"
    if compression == 3 and bits == 32:  # the masks follow a 40-byte header, or are in it
        masks = struct.unpack_from("<III", header, 54)
        if masks != _BMP_BGR_MASKS:
            shown = ", ".join(f"{mask:#010x}" for mask in masks)
            return (f"a 32-bit BMP with the colour masks {shown}, which TensorFlow ignores "
                    f"(it reads blue, green, red)")
    elif compression:
        name = _BMP_COMPRESSIONS.get(compression, "unknown")
        return (f"a BMP compressed with {name} ({compression}), which TensorFlow does not "
                f"decode (only uncompressed ones)")
    needed = start + (bits * width + 31) // 32 * 4 * abs(height)  # rows padded to 4 bytes
    size = os.path.getsize(path)
    if size < needed:
        return f"a truncated BMP ({size:,} bytes, its pixels need {needed:,})"
    if size > needed:
        return (f"a BMP of {size:,} bytes where its pixels need {needed:,} (TensorFlow reads "
                f"only exact lengths)")
    return None
