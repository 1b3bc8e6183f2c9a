"""`Pipeline` -> tf.data datasets, the input shape and the class names.

Loading happens in two steps so that bad data is refused before anything is written:
`load_arrays` reads and checks the data into memory (raising `DataError`) and splits it
into training, validation and test data, and `make_datasets` turns the training and
validation arrays into cached, prefetched `tf.data` pipelines, once per search. The test
arrays never reach a `Datasets`: the search cannot read them; the final model is scored
on them once, after the search.

Splits are stratified by class and seeded by `data.seed`: the test share is carved out
first (`data.test_split` of all the data, unless the data holds a test set of its own:
the official test split of mnist, fashion_mnist and cifar10, or an npz's `x_test`), then
the validation share (`data.validation_split` of all the data, or of the training data
when the test set is the data's own). The images stay raw (pixel values as stored); the model rescales them itself,
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
    """A pipeline's data in memory, split into training, validation and test data.

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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Datasets:
    """Batched, cached, prefetched training and validation datasets (never the test data)."""

    train: object
    validation: object


def load_arrays(pipeline: Pipeline) -> Arrays:
    """Read the pipeline's data into memory and check it.

    Raises:
        DataError: the data is missing, cannot be downloaded, or is malformed.
    """
    where = f"{pipeline.source_file}: data"
    source = pipeline.data_source
    x_val = y_val = x_test = y_test = class_names = None
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.images.astype("float32"), digits.target.astype("int64")
        class_names, default_scale = [str(c) for c in digits.target_names], 16.0
    elif source in _KERAS_FILES:
        (x, y), (x_test, y_test) = _keras_dataset(source, where)
        class_names, default_scale = _KERAS_CLASSES.get(source), 255.0
    elif source == "npz":
        x, y, x_val, y_val, x_test, y_test, class_names = _npz(pipeline.path, where)
        default_scale = 255.0 if x.dtype == np.uint8 else max(float(np.max(x)), 1.0)
    else:
        x, y, class_names = _directory(pipeline, where)
        default_scale = 255.0

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
        x, y, x_test, y_test = _split(x, y, test_split, rng, class_names, where, "test_split")
    if x_val is None:
        if pipeline.validation_split <= 0:
            raise DataError(f"{where}.validation_split: must be above 0 when the data has no "
                            f"validation arrays")
        # A share of all the data: of what the test split left, when it was carved here.
        share = pipeline.validation_split / (1 - (test_split if test_source == "split" else 0))
        x, y, x_val, y_val = _split(x, y, share, rng, class_names, where, "validation_split")
    return Arrays(x, y, x_val, y_val, tuple(class_names),
                  float(pipeline.pixel_scale or default_scale), x_test, y_test, test_source)


def _labels(y) -> np.ndarray:
    return np.asarray(y).reshape(-1).astype("int64")


def _split(x, y, share: float, rng, class_names, where: str, field: str):
    """`share` of each class drawn at random from (`x`, `y`): (rest x, rest y, drawn x, drawn y).

    Raises:
        DataError: a class has too few samples to appear on both sides.
    """
    if share <= 0:
        return x, y, x[:0], y[:0]
    drawn = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        count = max(1, int(round(len(members) * share)))
        if count >= len(members):
            raise DataError(f"{where}.{field}: class {class_names[label]!r} has "
                            f"{len(members)} sample(s) left, too few to appear in the "
                            f"training data and in this split; give it more images or "
                            f"lower the split")
        drawn.append(members[:count])
    picked = np.zeros(len(y), dtype=bool)
    picked[np.concatenate(drawn)] = True
    # Shuffled, so that no split is ordered by class.
    rest, chosen = rng.permutation(np.flatnonzero(~picked)), rng.permutation(np.flatnonzero(picked))
    return x[rest], y[rest], x[chosen], y[chosen]


def make_datasets(arrays: Arrays, batch_size: int, seed: int = 0) -> Datasets:
    """Cached, shuffled, batched and prefetched `tf.data` pipelines over `arrays`."""
    return Datasets(
        train=_pipeline(arrays.x_train, arrays.y_train, batch_size, seed, shuffle=True),
        validation=_pipeline(arrays.x_val, arrays.y_val, batch_size, seed, shuffle=False),
    )


def refit_dataset(arrays: Arrays, batch_size: int, seed: int = 0):
    """The training and validation data together, shuffled like the training data: what
    `--refit` retrains the final model on (never the test data)."""
    return _pipeline(np.concatenate([arrays.x_train, arrays.x_val]),
                     np.concatenate([arrays.y_train, arrays.y_val]), batch_size, seed,
                     shuffle=True)


def _pipeline(x, y, batch_size: int, seed: int, shuffle: bool):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


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
