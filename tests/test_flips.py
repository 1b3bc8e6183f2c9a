"""`train.test_time_flips`: the final model averages each image and its mirror image."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from nas import latency, results
from nas.cli import main
from nas.data import load_arrays
from nas.final_model import ensemble_of
from nas.specs import load_pipeline
from nas.tracking import Tracker


def nas(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def small_model(seed: int, name: str):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 5, 2))
    x = keras.layers.Conv2D(3, 3, activation="relu")(inputs)
    outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs, name=name)


def test_the_flipped_model_averages_each_image_and_its_mirror_and_loads_without_nas(tmp_path):
    x = np.random.default_rng(0).random((7, 6, 5, 2), dtype=np.float32)
    mirror = x[:, :, ::-1]  # left and right swapped: the width axis reversed
    members = [small_model(1, "a"), small_model(2, "b")]
    alone = members[0].predict(x, verbose=0)
    assert not np.allclose(alone, members[0].predict(mirror, verbose=0))  # it matters here

    one = ensemble_of(members[:1], ["1"], flips=True)
    np.testing.assert_allclose(one.predict(x, verbose=0),
                               (alone + members[0].predict(mirror, verbose=0)) / 2, atol=1e-6)
    two = ensemble_of(members, ["1", "2"], flips=True)
    expected = np.mean([m.predict(v, verbose=0) for m in members for v in (x, mirror)], axis=0)
    np.testing.assert_allclose(two.predict(x, verbose=0), expected, atol=1e-6)
    assert ensemble_of(members[:1], ["1"]) is members[0]  # no flips, one model: itself

    # Keras's own layers only: it loads where `nas` was never imported.
    two.save(tmp_path / "flipped.keras")
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, keras, numpy as np\n"
              f"model = keras.models.load_model({str(tmp_path / 'flipped.keras')!r})\n"
              f"np.save({str(tmp_path / 'p.npy')!r}, model.predict(np.load("
              f"{str(tmp_path / 'x.npy')!r}), verbose=0))\n"
              "assert not [m for m in sys.modules if m.split('.')[0] == 'nas'], 'nas imported'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, atol=1e-6)


@pytest.fixture
def flips_pipeline(tmp_path):
    path = tmp_path / "flipped.yaml"
    path.write_text("name: digits\ndata: {source: digits}\n"
                    "train: {test_time_flips: true, epochs: 1}\n")
    return path


@pytest.mark.slow
def test_a_search_scores_serves_and_exports_the_flipped_final_model(tmp_path, flips_pipeline):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--tracking-uri", uri, "--workdir", tmp_path / ".nas"]
    result = nas("search", "--space", "tiny", "--pipeline", flips_pipeline, "--max-trials",
                 "2", "--ensemble", "1", "--experiment", "flips", "--no-progress", *common)
    assert result.exit_code == 0, result.output
    tracker = Tracker(uri)
    search = results.find_search(tracker, "flips")
    (trial,) = search.final_trials
    assert search.tags["nas.test_time_flips"] == "1"
    member = keras.models.load_model(_trial_model(tmp_path, trial))
    arrays = load_arrays(load_pipeline(str(flips_pipeline)))
    x = arrays.x_test
    expected = (member.predict(x, verbose=0) + member.predict(x[:, :, ::-1], verbose=0)) / 2
    accuracy = float(np.mean(expected.argmax(axis=1) == arrays.y_test))
    assert search.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    line = (f"final model: trial {trial}, over each image and its mirror image, "
            f"test_accuracy {accuracy:.4f}")
    assert line in result.output
    assert line in nas("best", "--experiment", "flips", "--tracking-uri", uri).output

    import mlflow.pyfunc

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{search.run_id}/model")
    np.testing.assert_allclose(np.asarray(pyfunc.predict(x[:40])), expected[:40], atol=1e-5)

    out = tmp_path / "final"
    exported = nas("export", "--experiment", "flips", "--out", out, *common)
    assert exported.exit_code == 0, exported.output
    assert exported.output.startswith(f"exported trial {trial}, over each image and its mirror "
                                      f"image (the search's final model)")
    served = tf.saved_model.load(str(out)).signatures["serving_default"]
    (probabilities,) = served(image=tf.constant(x[:40])).values()
    np.testing.assert_allclose(probabilities.numpy(), expected[:40], atol=1e-5)
    assert json.loads((out / "class_names.json").read_text())["test_time_flips"] is True
    # The trial asked for by name is the trial as it was trained.
    alone = tmp_path / "alone"
    exported = nas("export", "--experiment", "flips", "--out", alone, "--trial", trial, *common)
    assert exported.output.startswith(f"exported trial {trial} of experiment 'flips'")
    served = tf.saved_model.load(str(alone)).signatures["serving_default"]
    (probabilities,) = served(image=tf.constant(x[:40])).values()
    np.testing.assert_allclose(probabilities.numpy(), member.predict(x[:40], verbose=0),
                               atol=1e-5)


def _trial_model(root, trial: str):
    """The trial's own network with its checkpoint's weights, saved as a .keras file."""
    from nas.export import load_trial_model

    tracker = Tracker(f"sqlite:///{root}/mlflow.db")
    search = results.find_search(tracker, "flips")
    row = next(r for r in results.list_trials(tracker, search) if r.trial_id == trial)
    model, _ = load_trial_model(tracker, search, row, root / ".nas")
    path = root / f"trial_{trial}.keras"
    model.save(path)
    return path


@pytest.mark.slow
def test_over_the_latency_budget_the_final_model_loses_its_flips_first(
        tmp_path, flips_pipeline, monkeypatch):
    def measure(model, engine, threads, runs=latency.RUNS):
        # 1 ms a network, twice that with the mirror images: known and repeatable.
        if model.name in ("layer", "empty"):
            return latency.Latency(engine, threads, 0.0, 0.0, 100)
        mirrored = any(layer.name == "mirror" for layer in model.layers)
        return latency.Latency(engine, threads, 2.0 if mirrored else 1.0, 0.0, 100)

    monkeypatch.setattr(latency, "measure", measure)
    result = nas("search", "--space", "tiny", "--pipeline", flips_pipeline, "--max-trials", "1",
                 "--experiment", "budget", "--max-latency-ms", "1.5", "--no-progress")
    assert result.exit_code == 0, result.output
    search = results.find_search(Tracker(), "budget")
    (trial,) = search.final_trials
    assert "the final model is over --max-latency-ms 1.5: without test-time flips" in \
        result.output
    assert search.tags["nas.test_time_flips"] == "0"
    assert search.metrics["latency_ms"] == 1.0
    assert f"final model: trial {trial}, test_accuracy" in result.output
