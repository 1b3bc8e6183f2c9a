"""mnist, fashion_mnist and cifar10 from local copies (nas.datasets), on files written here.

Never the machine's own copies: Keras's cache is a folder under tmp_path (KERAS_HOME) and
the system folders (`SYSTEM_FOLDERS`) are replaced by one under tmp_path.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nas import datasets
from nas.cli import main
from nas.data import load_arrays
from nas.errors import DataError
from nas.space import input_signature
from nas.specs import load_pipeline

TRAIN, TEST = 200, 50  # images of each official split written for a test


@pytest.fixture(autouse=True)
def _places(tmp_path, monkeypatch):
    """Keras's cache and the system folder under tmp_path, both empty."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(datasets, "SYSTEM_FOLDERS",
                        {"fashion_mnist": (str(tmp_path / "usr/share/datasets/fashion-mnist"),)})


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file's bytes: big-endian magic number, each dimension, the uint8 values."""
    magic = (0x803 if array.ndim == 3 else 0x801) if magic is None else magic
    return (struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.astype(np.uint8).tobytes())


def write_idx_files(folder, fill: int | None = None, gz: bool = True, seed: int = 0):
    """The four official IDX files of TRAIN and TEST 28x28 images in `folder`; their arrays
    (images random, or all `fill`; labels 0-9 in turn)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", TRAIN), ("t10k", TEST)):
        images = (rng.integers(0, 256, (count, 28, 28), dtype=np.uint8) if fill is None
                  else np.full((count, 28, 28), fill, np.uint8))
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        arrays[split] = (images, labels)
        write(folder / f"{split}-images-idx3-ubyte", idx_bytes(images), gz)
        write(folder / f"{split}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return arrays


def write(path, data: bytes, gz: bool = True):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def pipeline_file(tmp_path, source="fashion_mnist", path="data", name="p.yaml"):
    data = f"{{source: {source}" + (f", path: {path}" if path else "") + "}"
    file = tmp_path / name
    file.write_text(f"data: {data}\ntrain: {{batch_size: 32}}\n")
    return file


def fill_of(source, path):
    """The value every training image of the copy that was read holds."""
    (x, _), _ = datasets.load(source, path, "p.yaml: data")
    assert (x == x.flat[0]).all()
    return int(x.flat[0])


# --- reading IDX files -------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_idx_files_round_trip_and_their_test_split_is_the_test_data(tmp_path, gz):
    written = write_idx_files(tmp_path / "data", gz=gz)
    (x, y), (x_test, y_test) = datasets.load("fashion_mnist", str(tmp_path / "data"), "p: data")
    assert x.dtype == np.uint8 and x.shape == (TRAIN, 28, 28)
    assert np.array_equal(x, written["train"][0]) and np.array_equal(y, written["train"][1])
    assert np.array_equal(x_test, written["t10k"][0])
    assert np.array_equal(y_test, written["t10k"][1])

    pipeline = load_pipeline(str(pipeline_file(tmp_path)))  # path: data, relative to it
    arrays = load_arrays(pipeline)
    assert arrays.test_source == "own" and arrays.input_shape == (28, 28, 1)
    assert input_signature(pipeline) == (arrays.input_shape, arrays.num_classes,
                                         arrays.pixel_scale)  # what nas space show knows
    assert arrays.class_names[:2] == ("t-shirt", "trouser") and arrays.pixel_scale == 255
    assert np.array_equal(arrays.x_test[..., 0], written["t10k"][0])
    assert np.array_equal(arrays.y_test, written["t10k"][1])
    assert (len(arrays.y_train), len(arrays.y_val)) == (160, 40)  # from the training data
    seen = np.concatenate([arrays.x_train, arrays.x_val])[..., 0].astype(np.uint8)
    assert sorted(map(bytes, seen)) == sorted(map(bytes, written["train"][0]))


def broken(folder, how: str):
    """Write a good folder, then break it `how`; the message expected, after the file."""
    write_idx_files(folder)
    images, labels = folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz"
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (TRAIN, 28, 28), dtype=np.uint8)
    if how == "magic":
        write(folder / "train-labels-idx1-ubyte", idx_bytes(pixels[:, 0, 0], magic=0x803))
        return labels, "IDX magic number 0x00000803, not an IDX labels file's (0x00000801)"
    if how == "count":
        write(folder / "train-labels-idx1-ubyte", idx_bytes(np.arange(TRAIN - 1) % 10))
        return None, (f"{images} holds {TRAIN} images but {labels} holds {TRAIN - 1} labels")
    if how == "gzip":
        labels.write_bytes(gzip.compress(idx_bytes(np.arange(TRAIN) % 10))[:-20])
        return labels, "a truncated gzip file (it ends before its end-of-stream marker)"
    if how == "not gzip":
        labels.write_bytes(idx_bytes(np.arange(TRAIN) % 10))
        return labels, "not a readable gzip file (Not a gzipped file (b'\\x00\\x00'))"
    if how == "empty":
        labels.unlink()
        write(folder / "train-labels-idx1-ubyte", b"", gz=False)  # found when no .gz is
        return folder / "train-labels-idx1-ubyte", (
            "IDX magic number none, not an IDX labels file's (0x00000801)")
    if how == "data":
        write(folder / "train-images-idx3-ubyte", idx_bytes(pixels)[:-784])
        return images, (f"a truncated IDX images file (its header says {TRAIN} images of "
                        f"28x28, 156,800 bytes; it holds 156,016)")
    if how == "overlong":
        write(folder / "train-images-idx3-ubyte", idx_bytes(pixels) + b"\0")
        return images, (f"an overlong IDX images file (its header says {TRAIN} images of "
                        f"28x28, 156,800 bytes; it holds 156,801)")
    if how == "size":
        write(folder / "train-images-idx3-ubyte", idx_bytes(pixels.reshape(TRAIN, 14, 56)))
        return images, "images of 14x56; mnist's and fashion_mnist's are 28x28"
    assert how == "labels"
    write(folder / "train-labels-idx1-ubyte", idx_bytes(np.r_[0, 1, 2, 10, np.arange(196) % 10]))
    return labels, "label 10 (sample 3; 1 such) is not one of 0 to 9"


@pytest.mark.parametrize("how", ["magic", "count", "gzip", "not gzip", "empty", "data",
                                 "overlong", "size", "labels"])
def test_files_that_are_not_what_they_claim_are_refused_naming_them(tmp_path, how):
    file, message = broken(tmp_path / "data", how)
    where = f"{tmp_path / 'p.yaml'}: data.path: " + (f"{file}: " if file else "")
    with pytest.raises(DataError, match=f"^{re.escape(where + message)}$"):
        load_arrays(load_pipeline(str(pipeline_file(tmp_path))))


def test_a_data_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "data").write_text("")
    with pytest.raises(DataError, match=re.escape(
            f"data.path: {tmp_path / 'data'} is a file; for 'fashion_mnist' it names a folder "
            f"holding the four *-ubyte.gz files")):
        load_arrays(load_pipeline(str(pipeline_file(tmp_path))))


@pytest.mark.new_store
def test_a_broken_file_is_one_line_exit_2_and_nothing_written(tmp_path):
    file, message = broken(tmp_path / "data", "magic")
    pipeline = pipeline_file(tmp_path)
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--pipeline", str(pipeline)],
                                prog_name="nas")
    assert result.exit_code == 2
    assert result.output == f"Error: {pipeline}: data.path: {file}: {message}\n"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".nas").exists()
    assert not (tmp_path / "mlruns").exists()


# --- where they are looked for -------------------------------------------------------------


def test_data_path_then_keras_cache_then_the_system_folder(tmp_path):
    path, cache = tmp_path / "data", tmp_path / "keras/datasets/fashion-mnist"
    (system,) = datasets.SYSTEM_FOLDERS["fashion_mnist"]
    write_idx_files(Path(system), fill=3)
    assert fill_of("fashion_mnist", None) == 3  # the only copy
    assert fill_of("fashion_mnist", str(path)) == 3  # data.path empty: looked past
    write_idx_files(cache, fill=2, gz=False)
    assert fill_of("fashion_mnist", None) == 2  # the cache before the system folder
    write_idx_files(path, fill=1)
    assert fill_of("fashion_mnist", str(path)) == 1  # data.path first
    assert fill_of("fashion_mnist", None) == 2


def test_not_found_names_every_place_it_looked_and_how_to_get_the_files(tmp_path):
    (tmp_path / "data").mkdir()
    cache = tmp_path / "keras/datasets/fashion-mnist"
    write(cache / "train-images-idx3-ubyte", idx_bytes(np.zeros((1, 28, 28))))
    write(cache / "train-labels-idx1-ubyte", idx_bytes(np.zeros(1)))
    (system,) = datasets.SYSTEM_FOLDERS["fashion_mnist"]
    pipeline = pipeline_file(tmp_path)
    with pytest.raises(DataError) as caught:
        load_arrays(load_pipeline(str(pipeline)))
    assert str(caught.value) == (
        f"{pipeline}: data.source: 'fashion_mnist' not found offline; looked in "
        f"{tmp_path / 'data'}, {cache} (2 of the 4 files), {system}; install Debian's "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or put the four "
        f"*-ubyte.gz files in one of them, or run keras.datasets.fashion_mnist.load_data() "
        f"once online (it fills Keras's cache)")

    pipeline = pipeline_file(tmp_path, "mnist", path=None, name="m.yaml")  # no package
    with pytest.raises(DataError) as caught:
        load_arrays(load_pipeline(str(pipeline)))
    assert str(caught.value) == (
        f"{pipeline}: data.source: 'mnist' not found offline; looked in "
        f"{tmp_path / 'keras/datasets/mnist.npz'}; put the four *-ubyte.gz files in a folder "
        f"named by data.path, or run keras.datasets.mnist.load_data() once online (it fills "
        f"Keras's cache)")


def test_mnist_from_data_path_or_kerass_cached_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (TRAIN + TEST, 28, 28), dtype=np.uint8)
    y = (np.arange(TRAIN + TEST) % 10).astype(np.uint8)
    (tmp_path / "keras/datasets").mkdir(parents=True)
    np.savez(tmp_path / "keras/datasets/mnist.npz", x_train=x[:TRAIN], y_train=y[:TRAIN],
             x_test=x[TRAIN:], y_test=y[TRAIN:])
    (x_train, _), (x_test, y_test) = datasets.load("mnist", None, "p: data")
    assert np.array_equal(x_train, x[:TRAIN]) and np.array_equal(y_test, y[TRAIN:])
    written = write_idx_files(tmp_path / "data")
    (x_train, _), _ = datasets.load("mnist", str(tmp_path / "data"), "p: data")
    assert np.array_equal(x_train, written["train"][0])


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((2, 28, 28), np.uint8), "y_train": np.zeros(2, np.uint8)},
     "no x_test, y_test array (keras.datasets' mnist.npz holds x_train, y_train, x_test, "
     "y_test)"),
    ({"x_train": np.zeros((2, 28, 28)), "y_train": np.zeros(2, np.uint8),
      "x_test": np.zeros((2, 28, 28), np.uint8), "y_test": np.zeros(2, np.uint8)},
     "x_train is float64 (2, 28, 28), not mnist's uint8 (n, 28, 28)"),
    ({"x_train": np.zeros((2, 28, 28), np.uint8), "y_train": np.zeros(2, np.uint8),
      "x_test": np.zeros((2, 28, 28), np.uint8), "y_test": np.full(2, 0.5)},
     "{file} (y_test): labels of dtype float64, not integers"),
])
def test_a_cached_mnist_npz_that_is_not_mnist_is_refused(tmp_path, arrays, message):
    file = tmp_path / "keras/datasets/mnist.npz"
    file.parent.mkdir(parents=True)
    np.savez(file, **arrays)
    where = "p: data.source: " + ("" if message.startswith("{file}") else f"{file}: ")
    with pytest.raises(DataError, match=f"^{re.escape(where + message.format(file=file))}$"):
        datasets.load("mnist", None, "p: data")


# --- cifar10 -------------------------------------------------------------------------------


def write_cifar(folder, per_batch: int = 20):
    """CIFAR-10's six pickled batches: dicts with bytes keys, as its authors' Python 2
    pickles read with encoding="bytes" (pickle protocol 4: Python 3's protocol 2 spells
    bytes with `_codecs.encode`, which Python 2's never did and Keras does not allow)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = []
    for name in datasets.CIFAR10_FILES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(label) for label in rng.permutation(np.arange(per_batch) % 10)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"x.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
        written.append((data, labels))
    return written


def test_cifar10_from_data_path(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    pipeline = load_pipeline(str(pipeline_file(tmp_path, "cifar10", "cifar-10-batches-py")))
    arrays = load_arrays(pipeline)
    assert arrays.input_shape == (32, 32, 3) and arrays.test_source == "own"
    assert input_signature(pipeline) == (arrays.input_shape, arrays.num_classes,
                                         arrays.pixel_scale)
    assert arrays.class_names[0] == "airplane" and len(arrays.y_train) + len(arrays.y_val) == 100
    data, labels = written[-1]  # test_batch: rows of 1,024 red, 1,024 green, 1,024 blue
    assert arrays.y_test.tolist() == labels
    assert arrays.x_test[7, 5, 9].tolist() == [data[7, c * 1024 + 5 * 32 + 9] for c in range(3)]
    assert np.array_equal(arrays.x_test, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_a_cifar10_batch_of_other_images_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    batch = {b"data": np.zeros((4, 28 * 28), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=re.escape(
            f"p: data.path: {folder / 'data_batch_3'}: its data is uint8 (4, 784), not rows "
            f"of 3,072 bytes (32x32x3 uint8)")):
        datasets.load("cifar10", str(folder), "p: data")


def test_a_cifar10_batch_that_would_run_code_is_refused(tmp_path):
    class Gadget:
        def __reduce__(self):
            return os.system, ("echo unpickled",)

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Gadget()}, protocol=4))
    with pytest.raises(DataError, match=re.escape(
            f"data.path: {folder / 'test_batch'}: not a CIFAR-10 batch (it would build "
            f"posix.system, which a CIFAR-10 batch does not hold)")):
        datasets.load("cifar10", str(folder), "p: data")


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_search_on_fashion_mnist_files_scores_on_their_test_split(tmp_path):
    write_idx_files(tmp_path / "data")
    pipeline = pipeline_file(tmp_path)
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--pipeline", str(pipeline),
                                       "--max-trials", "1", "--epochs", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "searching tiny on p with evolution: 1 trial" in result.output
    assert re.search(rf"^final model: .*test_accuracy \d\.\d+ .* on {TEST} held-out samples "
                     rf"the search never saw$", result.output, re.MULTILINE), result.output
