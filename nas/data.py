"""`Pipeline` -> tf.data datasets, the input shape and the class names.

Loading happens in two steps so that bad data is refused before anything is written:
`load_arrays` reads and checks the data into memory (raising `DataError`), and
`make_datasets` turns the arrays into cached, prefetched `tf.data` pipelines, once per
search. The images stay raw (pixel values as stored); the model rescales them itself,
so an exported model takes images exactly as the pipeline reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from pathlib import Path

import numpy as np

from nas.specs import Pipeline

__all__ = ["DataError", "Arrays", "Datasets", "class_folders", "load_arrays", "make_datasets"]

_KERAS_FILES = {  # where keras.datasets looks, under $KERAS_HOME (default ~/.keras)
    "mnist": "datasets/mnist.npz",
    "fashion_mnist": "datasets/fashion-mnist/ (the four *-ubyte.gz files)",
    "cifar10": "datasets/cifar-10-batches-py-target/ (the extracted archive)",
}
_KERAS_CLASSES = {
    "fashion_mnist": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                "ship", "truck"],
}


class DataError(ValueError):
    """The pipeline's data is missing or unusable; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A pipeline's data in memory, split into training and validation."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: tuple[str, ...]
    pixel_scale: float

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Datasets:
    """Batched, cached, prefetched training and validation datasets."""

    train: object
    validation: object
    arrays: Arrays


def load_arrays(pipeline: Pipeline) -> Arrays:
    """Read the pipeline's data into memory and check it.

    Raises:
        DataError: the data is missing, cannot be downloaded, or is malformed.
    """
    where = f"{pipeline.source_file}: data"
    source = pipeline.data_source
    x_val = y_val = class_names = None
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.images.astype("float32"), digits.target.astype("int64")
        class_names, default_scale = [str(c) for c in digits.target_names], 16.0
    elif source in _KERAS_FILES:
        (x, y), (x_val, y_val) = _keras_dataset(source, where)
        class_names, default_scale = _KERAS_CLASSES.get(source), 255.0
    elif source == "npz":
        x, y, x_val, y_val, class_names = _npz(pipeline.path, where)
        default_scale = 255.0 if x.dtype == np.uint8 else max(float(np.max(x)), 1.0)
    else:
        x, y, class_names = _directory(pipeline, where)
        default_scale = 255.0

    x = _as_images(x, f"{where}.x_train")
    y = np.asarray(y).reshape(-1).astype("int64")
    if x_val is None:
        if pipeline.validation_split <= 0:
            raise DataError(f"{where}.validation_split: must be above 0 when the data has no "
                            f"validation arrays")
        order = np.random.default_rng(pipeline.seed).permutation(len(x))
        n_val = max(1, int(round(len(x) * pipeline.validation_split)))
        if n_val >= len(x):
            raise DataError(f"{where}: {len(x)} samples are too few to split off "
                            f"{pipeline.validation_split:.0%} for validation")
        x_val, y_val = x[order[:n_val]], y[order[:n_val]]
        x, y = x[order[n_val:]], y[order[n_val:]]
    else:
        x_val = _as_images(x_val, f"{where}.x_val")
        y_val = np.asarray(y_val).reshape(-1).astype("int64")
        if x_val.shape[1:] != x.shape[1:]:
            raise DataError(f"{where}: x_val images are {x_val.shape[1:]}, x_train images "
                            f"are {x.shape[1:]}")
    num_classes = int(max(y.max(), y_val.max())) + 1
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]
    if min(y.min(), y_val.min()) < 0 or num_classes > len(class_names):
        raise DataError(f"{where}: labels must be integers from 0 to {len(class_names) - 1}")
    if len(np.unique(y)) < 2:
        raise DataError(f"{where}: the training data holds only one class")
    return Arrays(x, y, x_val, y_val, tuple(class_names),
                  float(pipeline.pixel_scale or default_scale))


def make_datasets(arrays: Arrays, batch_size: int, seed: int = 0) -> Datasets:
    """Cached, shuffled, batched and prefetched `tf.data` pipelines over `arrays`."""
    import tensorflow as tf

    def pipeline(x, y, shuffle: bool):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
        if shuffle:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return Datasets(
        train=pipeline(arrays.x_train, arrays.y_train, shuffle=True),
        validation=pipeline(arrays.x_val, arrays.y_val, shuffle=False),
        arrays=arrays,
    )


def _as_images(x, field: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"{field}: shape {x.shape} is not (n, height, width[, channels])")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{field}: dtype {x.dtype} is not numeric")
    return x.astype("float32")


def _keras_dataset(source: str, where: str):
    import keras

    loader = getattr(keras.datasets, source)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # keras' "Downloading data from ..."
            return loader.load_data()
    except Exception as error:  # keras raises a bare Exception on a failed download
        reason = str(error).split(" -- ")[-1].strip() or error.__class__.__name__
        home = os.environ.get("KERAS_HOME", os.path.join("~", ".keras"))
        raise DataError(
            f"{where}.source: {source!r} could not be downloaded ({reason}); offline, put "
            f"the files at {os.path.join(home, _KERAS_FILES[source])}"
        ) from None


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
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"{where}.path: {path} must hold both x_val and y_val, or neither")
    for x_key, y_key in (("x_train", "y_train"), ("x_val", "y_val")):
        if x_key in arrays and len(arrays[x_key]) != len(arrays[y_key]):
            raise DataError(f"{where}.path: {path}: {x_key} has {len(arrays[x_key])} samples "
                            f"but {y_key} has {len(arrays[y_key])}")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    return (arrays["x_train"], arrays["y_train"], arrays.get("x_val"), arrays.get("y_val"),
            names)


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


def _directory(pipeline: Pipeline, where: str):
    root = Path(pipeline.path)
    classes = class_folders(pipeline)
    import tensorflow as tf

    channels = 1 if pipeline.color_mode == "grayscale" else 3
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and not p.name.startswith("."))
        for file in files:
            try:
                image = tf.io.decode_image(file.read_bytes(), channels=channels,
                                           expand_animations=False)
            except (tf.errors.InvalidArgumentError, OSError):
                raise DataError(f"{where}.path: {file} is not a readable image") from None
            image = tf.image.resize(image, pipeline.image_size, antialias=True)
            images.append(image.numpy())
            labels.append(label)
    if not images:
        raise DataError(f"{where}.path: {root} holds no images (PNG, JPEG, GIF or BMP)")
    return np.stack(images), np.array(labels), classes
