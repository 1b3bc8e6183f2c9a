"""`--refit`: the final model's trial trained again on training + validation data, never on
the test data, for the epochs its best score took; exported and scored as the final model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from mlflow import MlflowClient

import nas.tuning
from nas.cli import main
from nas.data import load_arrays
from nas.specs import load_pipeline
from test_splits import numbered_npz, numbers

pytestmark = pytest.mark.slow  # every test here runs searches


def served(folder, x):
    signature = tf.saved_model.load(str(folder)).signatures["serving_default"]
    return next(iter(signature(image=tf.constant(x)).values())).numpy()


def test_refit_retrains_the_final_model_on_training_and_validation_data(tmp_path, monkeypatch):
    fits = []  # (numbers seen in the training data, in the validation data, epochs)
    real_fit = nas.tuning.CandidateModel.fit

    def fit(self, hp, model, x, *args, validation_data=None, **kwargs):
        seen = {int(v) for images, _ in x for v in images.numpy()[:, 0, 0, 0]}
        validation = None if validation_data is None else {
            int(v) for images, _ in validation_data for v in images.numpy()[:, 0, 0, 0]}
        fits.append((seen, validation, kwargs.get("epochs")))
        return real_fit(self, hp, model, x, *args, validation_data=validation_data, **kwargs)

    monkeypatch.setattr(nas.tuning.CandidateModel, "fit", fit)
    monkeypatch.chdir(tmp_path)
    pipeline = numbered_npz(tmp_path)
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--pipeline", pipeline,
                                       "--max-trials", "3", "--epochs", "3", "--ensemble", "1",
                                       "--refit", "--experiment", "refit"])
    assert result.exit_code == 0, result.output

    client = MlflowClient()
    (search,) = client.search_runs([client.get_experiment_by_name("refit").experiment_id],
                                   "tags.`nas.kind` = 'search'")
    best = search.data.tags["nas.best_trial_id"]
    assert search.data.tags["nas.final_trials"] == best and search.data.tags["nas.refit"] == "1"
    assert search.data.params["refit"] == "true"
    best_step = json.loads((tmp_path / ".nas" / "refit" / f"trial_{best}" / "trial.json")
                           .read_text())["best_step"]

    arrays = load_arrays(load_pipeline(pipeline))
    train, validation, test = (numbers(arrays.x_train), numbers(arrays.x_val),
                               numbers(arrays.x_test))
    assert len(fits) == 4  # three trials, then the refit
    for seen, val, epochs in fits[:3]:
        assert seen == train and val == validation and epochs == 3
    seen, val, epochs = fits[3]
    assert seen == train | validation and not seen & test and val is None
    assert epochs == best_step + 1
    assert (f"refitting trial {best} on the training and validation data for {epochs} "
            f"epochs") in result.output
    metrics = search.data.metrics
    assert (f"final model: trial {best}, retrained on training + validation data, "
            f"test_accuracy {metrics['test_accuracy']:.4f}") in result.output

    # Exported without options: the refit model, from MLflow, scoring what the search said.
    exported = CliRunner().invoke(main, ["export", "--experiment", "refit", "--out", "final"])
    assert exported.exit_code == 0, exported.output
    assert exported.output.startswith(f"exported trial {best}, retrained on training + "
                                      f"validation data (the search's final model)")
    assert "weights:     the MLflow model runs:/" in exported.output
    assert f"test score:  test_accuracy {metrics['test_accuracy']:.4f}" in exported.output
    final = served(tmp_path / "final", arrays.x_test)
    accuracy = float(np.mean(final.argmax(axis=1) == arrays.y_test))
    assert abs(accuracy - metrics["test_accuracy"]) < 1e-6
    written = json.loads((tmp_path / "final" / "class_names.json").read_text())
    assert written["refit"] is True and written["test"]["test_accuracy"] == metrics["test_accuracy"]

    # The same trial by name: as the search trained it (its checkpoint), with no test score.
    trial = CliRunner().invoke(main, ["export", "--experiment", "refit", "--out", "trial",
                                      "--trial", best])
    assert trial.exit_code == 0, trial.output
    assert trial.output.startswith(f"exported trial {best} of experiment 'refit'")
    assert "the KerasTuner checkpoint" in trial.output and "test score" not in trial.output
    assert np.abs(served(tmp_path / "trial", arrays.x_test) - final).max() > 1e-3

    shown = CliRunner().invoke(main, ["best", "--experiment", "refit"])
    assert f"final model: trial {best}, retrained on training + validation data" in shown.output


def test_no_final_model_of_an_augmented_space_augments_what_it_serves(tmp_path):
    """Every path to a final model (the ensemble, --refit, the MLflow model, the export)
    leaves the training-only augmentation layers out: each serves what its trained
    networks compute without augmenting (Keras's inference mode, the augmentation layers
    in place), and augmenting would change what they serve."""
    import mlflow.tensorflow

    from nas import results
    from nas.architecture import Architecture
    from nas.models import build_model
    from nas.specs import load_space
    from nas.tracking import Tracker
    from test_images import augmented_space

    space = augmented_space(tmp_path / "augmented.yaml", "  flip: horizontal\n  rotation: 0.1\n"
                            "  zoom: 0.1\n  contrast: 0.2\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    x = load_arrays(load_pipeline("digits")).x_val[:32].astype("float32")
    for experiment, flags in (("ensemble", ["--ensemble", "2"]),
                              ("refit", ["--ensemble", "1", "--refit"])):
        result = CliRunner().invoke(main, [
            "search", "--space", str(space), "--max-trials", "2", "--epochs", "2",
            "--experiment", experiment, "--tracking-uri", uri,
            "--workdir", str(tmp_path / ".nas"), *flags])
        assert result.exit_code == 0, result.output
        client = MlflowClient(uri)
        (parent,) = client.search_runs(
            [client.get_experiment_by_name(experiment).experiment_id],
            "tags.`nas.kind` = 'search'")
        mlflow.set_tracking_uri(uri)
        try:
            logged = mlflow.tensorflow.load_model(f"runs:/{parent.info.run_id}/model")
        finally:
            mlflow.set_tracking_uri(None)
        kinds = {type(layer).__name__ for layer in _layers(logged)}
        assert not {k for k in kinds if k.startswith("Random")}, kinds
        assert "Conv2D" in kinds
        out = tmp_path / f"{experiment}-export"
        exported = CliRunner().invoke(main, ["export", "--experiment", experiment, "--out",
                                             str(out), "--tracking-uri", uri,
                                             "--workdir", str(tmp_path / ".nas")])
        assert exported.exit_code == 0, exported.output

        # The final model's trials, rebuilt with their augmentation layers and their
        # trained weights: the checkpoints, or the refit weights the MLflow model holds.
        tracker = Tracker(uri)
        search = results.find_search(tracker, experiment)
        values = {r.trial_id: r.values for r in results.list_trials(tracker, search)}
        members = []
        for trial_id in search.final_trials:
            network = Architecture.from_values(load_space(str(space)), values[trial_id],
                                               (8, 8, 1), 10, 16.0)
            assert any(layer.kind.startswith("Random") for layer in network.layers)
            member = build_model(network)
            if search.refit:
                member.set_weights(logged.get_weights())
            else:
                member.load_weights(tmp_path / ".nas" / experiment / f"trial_{trial_id}"
                                    / "checkpoint.weights.h5")
            members.append(member)
        assert len(members) == (1 if search.refit else 2)
        plain = np.mean([m(tf.constant(x), training=False).numpy() for m in members], axis=0)
        augmented = np.mean([m(tf.constant(x), training=True).numpy() for m in members],
                            axis=0)
        assert np.abs(augmented - plain).max() > 1e-3  # augmenting changes the answers
        np.testing.assert_allclose(served(out, x), plain, atol=1e-5)
        np.testing.assert_allclose(logged.predict(x, verbose=0), plain, atol=1e-5)


def _layers(model):
    """Every layer of `model`, inside nested models (an ensemble's members) too."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)
