"""A `directory` source: streamed through tf.data, checked up front, split by file."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main
from nas.data import DataError, load_arrays, make_datasets
from nas.specs import load_pipeline
from shapes import CLASSES, draw

# (PIL format, file suffix, PIL mode): every format and mode a directory may hold.
FORMATS = (("PNG", "png", "L"), ("PNG", "png", "RGBA"), ("JPEG", "jpg", "RGB"),
           ("GIF", "gif", "P"), ("BMP", "bmp", "RGB"), ("PNG", "png", "LA"))


def make_folder(root: Path, per_class: int, order=1, seed: int = 0) -> Path:
    """`per_class` shapes per class in mixed formats, modes and sizes, written in `order`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in list(range(per_class))[::order]:
            pil_format, suffix, mode = FORMATS[i % len(FORMATS)]
            image = Image.fromarray(draw(kind, 12 + 4 * (i % 3), rng)).convert(mode)
            image.save(root / kind / f"{kind}_{i:03d}.{suffix}", pil_format)
    return root


def break_some(root: Path) -> list[str]:
    """Four unreadable files among the images; their paths relative to `root`."""
    (root / "circle" / "notes.txt").write_text("not an image")
    (root / "square" / "empty.png").write_bytes(b"")
    whole = (root / "triangle" / "triangle_000.png").read_bytes()
    (root / "triangle" / "cut.png").write_bytes(whole[:len(whole) // 2])
    whole = (root / "triangle" / "triangle_002.jpg").read_bytes()
    (root / "triangle" / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    return ["circle/notes.txt", "square/empty.png", "triangle/cut.jpg", "triangle/cut.png"]


def augmented_space(path: Path, augment: str) -> Path:
    """The tiny space, named `augmented`, with the `augment:` section `augment` (YAML lines),
    written to `path`."""
    path.write_text(Path(__file__).parent.parent.joinpath("search_spaces", "tiny.yaml")
                    .read_text().replace("name: tiny", "name: augmented")
                    + "augment:\n" + augment)
    return path


def pipeline(path: Path, folder: Path, extra: str = "") -> str:
    path.write_text(f"name: {path.stem}\n"
                    f"data: {{source: directory, path: {folder}, image_size: 16, {extra}}}\n"
                    f"train: {{epochs: 2, batch_size: 16}}\n")
    return str(path)


def bmp(bits: int, pixels: bytes, width: int, height: int, compression: int = 0,
        palette: bytes = b"", header_size: int = 40, masks: bytes = b"") -> bytes:
    """A hand-made BMP file: `masks` go inside a longer header, as in BMP v4 and v5."""
    start = 14 + header_size + len(palette)
    header = struct.pack("<IiiHHIIiiII", header_size, width, height, 1, bits, compression,
                         len(pixels), 2835, 2835, len(palette) // 4, 0) + masks
    return (b"BM" + struct.pack("<IHHI", start + len(pixels), 0, 0, start)
            + header.ljust(header_size, b"\0") + palette + pixels)


@pytest.mark.new_store
def test_each_bmp_tensorflow_cannot_decode_is_refused_with_why(tmp_path):
    import tensorflow as tf
    from PIL import Image

    from nas.data import _unreadable

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (5, 7, 3), np.uint8))
    for mode in ("L", "RGB", "RGBA", "1", "P"):
        image.convert(mode).save(tmp_path / f"pil_{mode}.bmp")
    whole = (tmp_path / "pil_RGB.bmp").read_bytes()
    (tmp_path / "truncated.bmp").write_bytes(whole[:-10])
    (tmp_path / "padded.bmp").write_bytes(whole + b"\0\0")  # as some writers end a file
    grays = bytes(b for i in range(256) for b in (i, i, i, 0))
    (tmp_path / "rle8.bmp").write_bytes(bmp(8, bytes([4, 10, 0, 0, 4, 200, 0, 1]), 4, 2,
                                            compression=1, palette=grays))
    (tmp_path / "rgb16.bmp").write_bytes(bmp(16, bytes(16), 3, 2))
    row = bytes(range(9)) + b"\0\0\0"  # 3 pixels of 3 bytes, padded to 12
    (tmp_path / "top_down.bmp").write_bytes(bmp(24, row * 2, 3, -2))
    (tmp_path / "os2.bmp").write_bytes(b"BM" + struct.pack("<IHHIIHHHH", 50, 0, 0, 26, 12, 3,
                                                           2, 1, 24) + row * 2)
    bgra, rgba = (0xFF0000, 0xFF00, 0xFF, 0xFF000000), (0xFF, 0xFF00, 0xFF0000, 0xFF000000)
    pixels = bytes([10, 20, 30, 255] * 6)
    for name, masks in (("bitfields", bgra), ("rgba_masks", rgba)):
        (tmp_path / f"{name}.bmp").write_bytes(bmp(32, pixels, 3, 2, compression=3,
                                                   header_size=124,
                                                   masks=struct.pack("<4I", *masks)))
    refused = {
        "pil_1.bmp": "a 1-bit BMP, which TensorFlow does not decode (only 8-bit gray, 24- and "
                     "32-bit)",
        "pil_P.bmp": "a colour-palette BMP, whose palette TensorFlow ignores",
        "truncated.bmp": "a truncated BMP (164 bytes, its pixels need 174)",
        "padded.bmp": "a BMP of 176 bytes where its pixels need 174 (TensorFlow reads only "
                      "exact lengths)",
        "rle8.bmp": "a BMP compressed with RLE8 (1), which TensorFlow does not decode (only "
                    "uncompressed ones)",
        "rgb16.bmp": "a 16-bit BMP, which TensorFlow does not decode (only 8-bit gray, 24- "
                     "and 32-bit)",
        "os2.bmp": "an OS/2 BMP (12-byte header), which TensorFlow does not decode",
        "rgba_masks.bmp": "a 32-bit BMP with the colour masks 0x000000ff, 0x0000ff00, "
                          "0x00ff0000, which TensorFlow ignores (it reads blue, green, red)",
    }
    accepted = ["bitfields.bmp", "pil_L.bmp", "pil_RGB.bmp", "pil_RGBA.bmp", "top_down.bmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*refused, *accepted])
    for path in sorted(tmp_path.iterdir()):
        assert _unreadable(str(path)) == refused.get(path.name), path.name
        try:  # as `ImageFiles.read` decodes it, against what PIL sees
            decoded = tf.io.decode_image(tf.io.read_file(str(path)), channels=3,
                                         expand_animations=False).numpy()
            faithful = np.array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))
        except tf.errors.InvalidArgumentError:
            faithful = False
        assert faithful == (path.name in accepted), path.name


@pytest.mark.new_store
def test_unreadable_files_are_refused_in_one_line_before_anything_is_written(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=6)
    bad = break_some(folder)
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--pipeline",
                                       pipeline(tmp_path / "p.yaml", folder)])
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"Error: {tmp_path / 'p.yaml'}: data.path: 4 of 22 files are not readable images: "
        f"{bad[0]} (not an image); {bad[1]} (an empty file); {bad[2]} (broken: "
        f"Truncated File Read) and 1 more; fix or remove them, or pass --skip-bad-images to "
        f"leave them out\n")
    assert not (tmp_path / ".nas").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_class_folder_left_without_images_is_refused(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=6)
    for path in (folder / "square").iterdir():
        path.write_text("not an image")
    spec = load_pipeline(pipeline(tmp_path / "p.yaml", folder))
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 'p.yaml'}: data.path: class folder 'square' holds no readable "
            f"images (its 6 file(s) are not readable images); add images to it, or remove it")):
        load_arrays(spec, skip_bad_images=True)
    for path in (folder / "square").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 'p.yaml'}: data.path: class folder 'square' holds no readable "
            f"images; add images to it, or remove it")):
        load_arrays(spec)


def test_the_split_is_by_file_stratified_seeded_and_independent_of_the_listing_order(tmp_path):
    one = load_arrays(load_pipeline(pipeline(tmp_path / "a.yaml",
                                             make_folder(tmp_path / "a", per_class=20))))
    # The same files, written in the reverse order (a different directory listing order).
    again = load_arrays(load_pipeline(pipeline(tmp_path / "b.yaml",
                                               make_folder(tmp_path / "b", 20, order=-1))))
    assert (len(one.x_train), len(one.x_val), len(one.x_test)) == (36, 12, 12)
    for split in ("x_train", "x_val", "x_test"):
        names = [Path(p).name for p in getattr(one, split)]
        assert names == [Path(p).name for p in getattr(again, split)]
        assert {name.split("_")[0] for name in names} == set(CLASSES)  # each class in each
    other = load_arrays(load_pipeline(pipeline(tmp_path / "c.yaml", tmp_path / "a", "seed: 1")))
    assert sorted(other.x_test) != sorted(one.x_test)


def sides(arrays) -> dict:
    """Each file's side of the split, by its path in the folder ("circle/circle_003.png")."""
    return {str(Path(path).relative_to(Path(path).parent.parent)): split
            for split in ("x_train", "x_val", "x_test") for path in getattr(arrays, split)}


def test_a_files_side_depends_neither_on_the_listing_order_nor_on_the_other_files(
        tmp_path, monkeypatch):
    import nas.data

    folder = make_folder(tmp_path / "data", per_class=20)
    spec = load_pipeline(pipeline(tmp_path / "p.yaml", folder))
    before = load_arrays(spec)
    scandir = os.scandir

    class Reversed:  # the same entries, listed in the reverse order
        def __init__(self, path):
            self.entries = sorted(scandir(path), key=lambda entry: entry.name, reverse=True)

        def __enter__(self):
            return self.entries

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(nas.data.os, "scandir", Reversed)
    listed = load_arrays(spec)
    for split in ("x_train", "x_val", "x_test"):
        assert list(getattr(listed, split)) == list(getattr(before, split))
    monkeypatch.undo()

    # 21 circles split 13/4/4 as 20 do 12/4/4: a new one moves at most one other file.
    copy = (folder / "circle" / "circle_000.png").read_bytes()
    for name in ("a.png", "m.png", "circle_010b.png", "z.png", "zz.png", "0.png"):
        (folder / "circle" / name).write_bytes(copy)
        after = sides(load_arrays(spec))
        moved = [path for path, split in sides(before).items() if after[path] != split]
        assert len(moved) <= 1, (name, moved)
        (folder / "circle" / name).unlink()


@pytest.mark.slow
def test_a_search_does_not_resume_on_other_files(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=6)
    uri = f"sqlite:///{tmp_path}/store.db"
    args = ["search", "--space", "tiny", "--pipeline", pipeline(tmp_path / "p.yaml", folder),
            "--max-trials", "1", "--epochs", "1", "--ensemble", "1", "--experiment", "grown",
            "--tracking-uri", uri, "--workdir", str(tmp_path / "work")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    state = tmp_path / "work" / "grown" / "nas_search.json"
    written = state.read_text()
    client = MlflowClient(uri)
    (search,) = client.search_runs([client.get_experiment_by_name("grown").experiment_id],
                                   "tags.`nas.kind` = 'search'")
    runs = len(client.search_runs([search.info.experiment_id]))

    (folder / "circle" / "circle_new.png").write_bytes(
        (folder / "circle" / "circle_000.png").read_bytes())
    refused = (f"Error: {tmp_path / 'p.yaml'}: data.path: the images in {folder} changed "
               f"since this search started (18 files then, 19 now), so its split would "
               f"differ; restore them, or pass --overwrite to start afresh, or choose another "
               f"--experiment\n")
    again = CliRunner().invoke(main, args + ["--max-trials", "2"])
    assert (again.exit_code, again.output) == (2, refused)
    assert state.read_text() == written
    assert len(client.search_runs([search.info.experiment_id])) == runs
    # Its working folder lost: found again in the tracking store, and refused the same.
    state.unlink()
    again = CliRunner().invoke(main, args)
    assert (again.exit_code, again.output) == (2, refused)
    assert search.data.tags["nas.data_digest"] == json.loads(written)["data_digest"]
    # A state an earlier nas wrote (no digest: its split of a folder was another) is refused
    # as such, whatever the files.
    (folder / "circle" / "circle_new.png").unlink()
    state.write_text(json.dumps({k: v for k, v in json.loads(written).items()
                                 if not k.startswith("data_")}))
    again = CliRunner().invoke(main, args)
    assert (again.exit_code, again.output) == (2, (
        f"Error: {tmp_path / 'p.yaml'}: data.path: this search was started by an earlier "
        f"nas, which split the images in {folder} otherwise; pass --overwrite to start "
        f"afresh, or choose another --experiment\n"))


def test_streamed_and_cached_images_are_the_same_pixels(tmp_path):
    from PIL import Image

    folder = make_folder(tmp_path / "data", per_class=6)
    batches = {}
    for cache in ("memory", "none"):
        arrays = load_arrays(load_pipeline(pipeline(tmp_path / f"{cache}.yaml", folder,
                                                    f"cache: {cache}, color_mode: rgb")))
        assert arrays.input_shape == (16, 16, 3)
        batches[cache] = [(x.numpy(), y.numpy()) for x, y in
                          make_datasets(arrays, batch_size=5).validation]
    for (x_memory, y_memory), (x_disk, y_disk) in zip(batches["memory"], batches["none"]):
        np.testing.assert_array_equal(x_memory, x_disk)
        np.testing.assert_array_equal(y_memory, y_disk)
    x, y = batches["none"][0]
    assert x.dtype == np.float32 and x.shape[1:] == (16, 16, 3) and x.max() > 100  # raw pixels
    first = arrays.x_val[0]  # what PIL sees, resized the same way, within rounding
    expected = np.asarray(Image.open(first).convert("RGB").resize((16, 16), Image.BILINEAR),
                          dtype="float32")
    assert np.abs(x[0] - expected).mean() < 25
    assert list(y) == [CLASSES.index(Path(p).parent.name) for p in arrays.x_val[:5]]


def test_a_splits_images_as_numpy_are_what_the_model_is_given(tmp_path):
    from nas.data import images

    folder = make_folder(tmp_path / "data", per_class=6)
    arrays = load_arrays(load_pipeline(pipeline(tmp_path / "p.yaml", folder, "test_split: 0")))
    x, y = images(arrays, "val")
    streamed = list(make_datasets(arrays, batch_size=4).validation)
    np.testing.assert_array_equal(x, np.concatenate([batch.numpy() for batch, _ in streamed]))
    np.testing.assert_array_equal(y, arrays.y_val)
    assert x.dtype == np.float32 and x.shape == (len(arrays.y_val), 16, 16, 1)
    x, y = images(arrays, "test")  # no test data: no images, of the right shape
    assert x.shape == (0, 16, 16, 1) and len(y) == 0
    digits = load_arrays(load_pipeline("digits"))  # in memory already: the arrays themselves
    assert images(digits, "train")[0] is digits.x_train


@pytest.mark.slow
def test_a_mixed_folder_streams_trains_skips_bad_files_and_augments_in_training_only(tmp_path):
    """A search on a folder of mixed formats and modes, broken files skipped, with an
    augmented space: the exported model serves exactly what the trained network computes
    without augmenting."""
    import tensorflow as tf

    from nas import results
    from nas.architecture import Architecture
    from nas.models import build_model
    from nas.specs import load_space
    from nas.tracking import Tracker

    folder = make_folder(tmp_path / "data", per_class=24)
    bad = break_some(folder)
    space = augmented_space(tmp_path / "augmented.yaml",
                            "  flip: horizontal\n  rotation: [0.05, 0.1]\n  translation: 0.1\n"
                            "  zoom: 0.1\n  contrast: 0.2\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(main, [
        "search", "--space", str(space), "--max-trials", "2", "--ensemble", "1",
        "--pipeline", pipeline(tmp_path / "p.yaml", folder, "cache: none"),
        "--skip-bad-images", "--experiment", "folder", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "2 trials finished, 0 failed" in result.output

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("folder").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("nas.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("nas.kind") == "trial"]
    assert parent.data.params["skipped_images"] == "4"
    listed = Path(client.download_artifacts(parent.info.run_id, "skipped_images.txt",
                                            str(tmp_path))).read_text().split()
    assert [str(Path(p).relative_to(folder)) for p in listed] == bad
    assert int(parent.data.params["train_samples"]) + int(parent.data.params["val_samples"]) \
        + int(parent.data.params["test_samples"]) == 72
    for run in trials:  # the augmentation knobs are hyperparameters like any other
        assert run.data.params["augment/flip"] == "horizontal"
        assert run.data.params["augment/rotation"] in ("0.05", "0.1")

    out = tmp_path / "model"
    exported = CliRunner().invoke(main, ["export", "--experiment", "folder", "--out", str(out),
                                         "--tracking-uri", uri])
    assert exported.exit_code == 0, exported.output
    arrays = load_arrays(load_pipeline(str(tmp_path / "p.yaml")), skip_bad_images=True)
    x = np.concatenate([batch.numpy() for batch, _ in make_datasets(arrays, 16).validation])
    served = tf.saved_model.load(str(out)).signatures["serving_default"]
    probabilities = served(image=tf.constant(x))["output_0"].numpy()

    tracker = Tracker(uri)
    trial_id = json.loads((out / "class_names.json").read_text())["trial_id"]  # the final model's
    (best,) = [t for t in results.list_trials(tracker, results.find_search(tracker, "folder"))
               if t.trial_id == trial_id]
    augmented = Architecture.from_values(load_space(str(space)), best.values, (16, 16, 1), 3,
                                         255.0)
    assert [layer.kind for layer in augmented.layers[1:6]] == [
        "RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom", "RandomContrast"]
    # The trained network with its augmentation layers in place: what it computes in
    # Keras's inference mode is what the export serves, and augmenting would change it.
    model = build_model(augmented)
    model.load_weights(tmp_path / ".nas" / "folder" / f"trial_{best.trial_id}"
                       / "checkpoint.weights.h5")
    plain = model(tf.constant(x), training=False).numpy()
    trained = model(tf.constant(x), training=True).numpy()
    assert np.abs(trained - plain).max() > 1e-3  # they do act in training
    np.testing.assert_allclose(probabilities, plain, atol=1e-5)
