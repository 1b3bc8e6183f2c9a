"""Training, validation and test data: stratified, disjoint, seeded, and the test data is
read once, by the final model, after the search."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from mlflow import MlflowClient

import nas.data
import nas.datasets
import nas.tuning
from nas.cli import main
from nas.data import load_arrays
from nas.specs import load_pipeline


def numbered_npz(tmp_path, counts=(150, 90, 60), **extra) -> str:
    """An npz whose every image is filled with its own sample number (so splits can be
    told apart by value), with `counts[c]` samples of class c; a pipeline reading it."""
    y = np.repeat(np.arange(len(counts)), counts)
    x = np.repeat(np.arange(len(y), dtype="float32"), 16).reshape(-1, 4, 4)
    np.savez(tmp_path / "numbered.npz", x_train=x, y_train=y, **extra)
    path = tmp_path / "numbered.yaml"
    path.write_text("data: {source: npz, path: numbered.npz, pixel_scale: 1000, seed: 3}\n"
                    "train: {epochs: 2, batch_size: 16}\n")
    return str(path)


def numbers(x) -> set:
    return {int(v) for v in np.asarray(x)[:, 0, 0, 0]}


def test_splits_are_60_20_20_stratified_disjoint_and_seeded(tmp_path):
    arrays = load_arrays(load_pipeline(numbered_npz(tmp_path)))
    assert (len(arrays.y_train), len(arrays.y_val), len(arrays.y_test)) == (180, 60, 60)
    assert arrays.test_source == "split"
    for labels in (arrays.y_train, arrays.y_val, arrays.y_test):  # each class in its share
        share = len(labels) / 300
        assert np.bincount(labels).tolist() == [round(c * share) for c in (150, 90, 60)]
    train, val, test = numbers(arrays.x_train), numbers(arrays.x_val), numbers(arrays.x_test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(300))
    again = load_arrays(load_pipeline(str(tmp_path / "numbered.yaml")))
    assert numbers(again.x_test) == test and numbers(again.x_val) == val
    other = tmp_path / "other.yaml"
    other.write_text((tmp_path / "numbered.yaml").read_text().replace("seed: 3", "seed: 4"))
    assert numbers(load_arrays(load_pipeline(str(other))).x_test) != test


def test_digits_hold_out_a_fifth_for_the_test(tmp_path):
    arrays = load_arrays(load_pipeline("digits"))
    assert (len(arrays.y_train), len(arrays.y_val), len(arrays.y_test)) == (1079, 359, 359)
    assert set(np.bincount(arrays.y_test)) <= {35, 36, 37}


def test_an_npz_test_set_is_the_test_set_and_test_split_0_turns_it_off(tmp_path):
    x_test = np.full((30, 4, 4), -1.0, dtype="float32")
    path = numbered_npz(tmp_path, x_test=x_test, y_test=np.arange(30) % 3)
    arrays = load_arrays(load_pipeline(path))
    assert arrays.test_source == "own" and numbers(arrays.x_test) == {-1}
    # validation: a fifth of the training data, as without a test set of its own
    assert (len(arrays.y_train), len(arrays.y_val)) == (240, 60)

    off = tmp_path / "off.yaml"
    off.write_text("data: {source: npz, path: numbered.npz, test_split: 0}\n")
    arrays = load_arrays(load_pipeline(str(off)))
    assert arrays.test_source == "none" and len(arrays.y_test) == 0
    assert len(arrays.y_train) + len(arrays.y_val) == 300

    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("data: {source: npz, path: numbered.npz, test_split: 0.1}\n")
    with pytest.raises(nas.data.DataError, match=r"data.test_split: the npz data holds a test "
                                                 r"set of its own"):
        load_arrays(load_pipeline(str(explicit)))


def test_keras_datasets_test_on_their_official_test_split(monkeypatch):
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 255, (500, 28, 28), dtype=np.uint8), np.arange(500) % 10)
    official = (np.zeros((100, 28, 28), dtype=np.uint8), np.arange(100) % 10)
    monkeypatch.setattr(nas.datasets, "load", lambda source, path, where: (train, official))
    arrays = load_arrays(load_pipeline("mnist"))
    assert arrays.test_source == "own"
    assert len(arrays.y_test) == 100 and not arrays.x_test.any()  # the official test split
    assert (len(arrays.y_train), len(arrays.y_val)) == (400, 100)  # validation from training
    assert np.bincount(arrays.y_val).tolist() == [10] * 10


@pytest.mark.slow
def test_the_search_never_reads_the_test_data_and_scores_the_final_model_once(
        tmp_path, monkeypatch):
    seen = set()
    real_fit = nas.tuning.CandidateModel.fit

    def fit(self, hp, model, x, *args, validation_data=None, **kwargs):
        for data in (x, validation_data):
            for images, _ in data:
                seen.update(int(v) for v in images.numpy()[:, 0, 0, 0])
        return real_fit(self, hp, model, x, *args, validation_data=validation_data, **kwargs)

    evaluated = []
    real_evaluate = tf.keras.Model.evaluate

    def evaluate(self, x, *args, **kwargs):
        if not kwargs.get("_use_cached_eval_dataset"):  # not fit's validation passes (seen above)
            evaluated.append(set().union(*(numbers(images.numpy()) for images, _ in x)))
        return real_evaluate(self, x, *args, **kwargs)

    monkeypatch.setattr(nas.tuning.CandidateModel, "fit", fit)
    monkeypatch.setattr(tf.keras.Model, "evaluate", evaluate)
    pipeline = numbered_npz(tmp_path)
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--pipeline", pipeline,
                                       "--max-trials", "3", "--experiment", "held"])
    assert result.exit_code == 0, result.output
    test = numbers(load_arrays(load_pipeline(pipeline)).x_test)
    assert len(seen) == 240 and not seen & test  # training + validation, never the test
    assert evaluated == [test]  # scored once, on the test data

    client = MlflowClient()
    (search,) = client.search_runs([client.get_experiment_by_name("held").experiment_id],
                                   "tags.`nas.kind` = 'search'")
    metrics = search.data.metrics
    assert metrics["test_samples"] == 60 and search.data.params["test_data"] == "split"
    final = search.data.tags["nas.final_trials"].split(",")
    # the default final model: the best three trials (on validation), averaged
    assert len(final) == 3 and final[0] == search.data.tags["nas.best_trial_id"]
    assert (f"final model: ensemble of trials {', '.join(final)} (their probabilities "
            f"averaged), test_accuracy {metrics['test_accuracy']:.4f}  test_loss "
            f"{metrics['test_loss']:.4f}  on 60 held-out samples") in result.output

    shown = CliRunner().invoke(main, ["best", "--experiment", "held"])
    assert f"test_accuracy {metrics['test_accuracy']:.4f}" in shown.output

    exported = CliRunner().invoke(main, ["export", "--experiment", "held", "--out", "out"])
    assert exported.exit_code == 0, exported.output
    assert f"test score:  test_accuracy {metrics['test_accuracy']:.4f}" in exported.output
    written = json.loads((tmp_path / "out" / "class_names.json").read_text())
    assert written["test"]["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    # The exported model, on the test data, scores what the search reported.
    arrays = load_arrays(load_pipeline(pipeline))
    served = tf.saved_model.load(str(tmp_path / "out")).signatures["serving_default"]
    probabilities = next(iter(served(image=tf.constant(arrays.x_test)).values())).numpy()
    accuracy = float(np.mean(probabilities.argmax(axis=1) == arrays.y_test))
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_without_test_data_the_summary_says_there_is_no_test_score(tmp_path):
    pipeline = tmp_path / "no_test.yaml"
    pipeline.write_text("data: {source: digits, test_split: 0}\ntrain: {epochs: 1}\n")
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--pipeline",
                                       str(pipeline), "--max-trials", "1"])
    assert result.exit_code == 0, result.output
    assert "no test score (no test data: data.test_split is 0" in result.output
