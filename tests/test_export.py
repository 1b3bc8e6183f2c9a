"""`nas export` and the MLflow model of a search: the same predictions everywhere."""

from __future__ import annotations

import json
import subprocess
import types

import numpy as np
import pytest
from click.testing import CliRunner

from nas.cli import main
from nas.tracking import TAG_KIND, TAG_SEARCH, TAG_TRIAL, Tracker


def nas(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def images():
    """Validation images of the digits pipeline, as it reads them (raw pixels 0..16)."""
    from nas.data import load_arrays
    from nas.specs import load_pipeline

    arrays = load_arrays(load_pipeline("digits"))
    return arrays.x_val[:32].astype("float32"), arrays.y_val[:32]


@pytest.fixture(scope="module")
def trained(digits_search):
    """The best trial's Keras model, rebuilt from its MLflow params and KerasTuner's checkpoint."""
    from nas import results
    from nas.architecture import Architecture
    from nas.models import build_model
    from nas.specs import load_space

    tracker = Tracker(digits_search.tracking_uri)
    search = results.find_search(tracker, "shared")
    best = results.best_trial(results.list_trials(tracker, search), search)
    model = build_model(Architecture.from_values(load_space("tiny"), best.values, (8, 8, 1), 10,
                                                 16.0))
    model.load_weights(f"{digits_search.workdir}/shared/trial_{best.trial_id}/"
                       f"checkpoint.weights.h5")
    return types.SimpleNamespace(model=model, trial=best, search=search)


@pytest.fixture(scope="module")
def exported(digits_search, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "digits-model"
    result = nas("export", "--experiment", "shared", "--out", out, "--register", "digits-cnn",
                 "--tracking-uri", digits_search.tracking_uri, "--workdir", digits_search.workdir)
    assert result.exit_code == 0, result.output
    return types.SimpleNamespace(out=out, output=result.output)


@pytest.mark.slow
def test_export_round_trip(digits_search, trained, exported, images, monkeypatch):
    import mlflow.pyfunc
    import tensorflow as tf

    x, y = images
    keras_probabilities = trained.model.predict(x, verbose=0)
    assert (keras_probabilities.argmax(1) == y).mean() > 0.5  # the trained weights, not fresh

    served = tf.saved_model.load(str(exported.out)).signatures["serving_default"]
    saved_probabilities = served(image=tf.constant(x))["output_0"].numpy()
    np.testing.assert_allclose(saved_probabilities, keras_probabilities, atol=1e-5)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", digits_search.tracking_uri)
    search_run = digits_search.result.search_run_id
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{search_run}/model")
    np.testing.assert_allclose(np.asarray(pyfunc.predict(x)), keras_probabilities, atol=1e-5)


@pytest.mark.slow
def test_export_writes_class_names_and_says_where(digits_search, trained, exported):
    names = json.loads((exported.out / "class_names.json").read_text())
    assert names["class_names"] == [str(d) for d in range(10)]
    assert names["input_shape"] == [8, 8, 1]
    assert names["trial_id"] == trained.trial.trial_id
    out = exported.output.splitlines()
    assert out[0] == (f"exported trial {trained.trial.trial_id} (the search's final model) of "
                      f"experiment 'shared' (val_accuracy {trained.trial.objective:.4f}) to "
                      f"{exported.out} as a SavedModel")
    assert out[1] == (f"  weights:     the KerasTuner checkpoint {digits_search.workdir}/shared/"
                      f"trial_{trained.trial.trial_id}/checkpoint.weights.h5")
    assert out[-1] == ("registered as digits-cnn version 1 (alias champion: "
                       "models:/digits-cnn@champion)")


@pytest.mark.slow
def test_saved_model_cli_lists_the_serving_signature(exported):
    shown = subprocess.run(["saved_model_cli", "show", "--dir", str(exported.out), "--all"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    signature = shown.stdout.split("signature_def['serving_default']:")[1]
    assert "inputs['image'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 8, 8, 1)" \
        in signature
    assert "outputs['output_0'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 10)" \
        in signature


@pytest.mark.slow
def test_registered_model_loads(digits_search, exported, images, trained, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", digits_search.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/digits-cnn/1")
    x, _ = images
    np.testing.assert_allclose(np.asarray(model.predict(x)),
                               trained.model.predict(x, verbose=0), atol=1e-5)
    from mlflow import MlflowClient

    champion = MlflowClient().get_model_version_by_alias("digits-cnn", "champion")
    assert str(champion.version) == "1"  # the first registered version with a test score
    test = digits_search.result.test
    assert float(champion.tags["nas.test_accuracy"]) == pytest.approx(test["test_accuracy"],
                                                                       rel=1e-5)


@pytest.mark.slow
def test_export_by_run_id_without_the_workdir(digits_search, trained, images, tmp_path):
    """Another machine: only the tracking store, the weights come from the MLflow model."""
    import tensorflow as tf

    search_run = digits_search.result.search_run_id
    result = nas("export", "--run", search_run, "--out", tmp_path / "m", "--workdir",
                 tmp_path / "empty", "--tracking-uri", digits_search.tracking_uri)

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1] == (f"  weights:     the MLflow model "
                                             f"runs:/{search_run}/model")
    x, _ = images
    served = tf.saved_model.load(str(tmp_path / "m")).signatures["serving_default"]
    np.testing.assert_allclose(served(image=tf.constant(x))["output_0"].numpy(),
                               trained.model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.slow
def test_export_tflite(digits_search, trained, images, tmp_path):
    import tensorflow as tf

    result = nas("export", "--experiment", "shared", "--format", "tflite", "--out",
                 tmp_path / "lite", "--tracking-uri", digits_search.tracking_uri, "--workdir",
                 digits_search.workdir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "lite").iterdir()) == ["class_names.json",
                                                                     "model.tflite"]
    x, _ = images
    interpreter = tf.lite.Interpreter(model_path=str(tmp_path / "lite" / "model.tflite"))
    run = interpreter.get_signature_runner("serving_default")
    probabilities = run(image=x[:1])["output_0"]
    np.testing.assert_allclose(probabilities, trained.model.predict(x[:1], verbose=0), atol=1e-5)


@pytest.mark.slow
def test_non_empty_out_needs_force(digits_search, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    common = ["--experiment", "shared", "--out", out, "--tracking-uri",
              digits_search.tracking_uri, "--workdir", digits_search.workdir]

    refused = nas("export", *common)
    assert refused.exit_code == 2
    assert refused.output == (f"Error: --out: {out} is not empty; pass --force to replace its "
                              f"content\n")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    # --force replaces an earlier export only, never a folder of other files
    forced = nas("export", *common, "--force")
    assert forced.exit_code == 2
    assert forced.output == (f"Error: --out: {out} holds files that are not a nas export; "
                             f"--force only replaces an earlier export, choose a folder of "
                             f"its own\n")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    (out / "notes.txt").unlink()
    assert nas("export", *common).exit_code == 0
    (out / "stale.txt").write_text("from the earlier export")
    assert nas("export", *common).exit_code == 2  # not empty
    forced = nas("export", *common, "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in out.iterdir()) == ["assets", "class_names.json",
                                                     "fingerprint.pb", "saved_model.pb",
                                                     "variables"]


@pytest.mark.slow
def test_unknown_experiment_or_run(digits_search, tmp_path):
    uri = digits_search.tracking_uri
    result = nas("export", "--experiment", "nope", "--out", tmp_path / "x", "--tracking-uri", uri)
    assert result.exit_code == 2
    assert result.output == (f"Error: --experiment: no experiment 'nope' in {uri} (it holds: "
                             f"'shared')\n")

    result = nas("export", "--run", "0123abcd", "--out", tmp_path / "x", "--tracking-uri", uri)
    assert result.exit_code == 2
    assert result.output == f"Error: --run: no run '0123abcd' in {uri}\n"
    assert not (tmp_path / "x").exists()

    result = nas("export", "--run", "0123abcd", "--experiment", "shared", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert result.output == ("Error: --experiment and --run exclude each other; give one "
                             "(see 'main export --help')\n")


def test_no_finished_trial_exports_nothing(tmp_path):
    tracker = Tracker()
    experiment_id = tracker.experiment_id("broken")
    search_run = tracker.start_run(experiment_id, "search", tags={TAG_KIND: "search"})
    tracker.log_params(search_run, {"objective": "val_accuracy"})
    trial_run = tracker.start_run(experiment_id, "trial-0", parent_run_id=search_run,
                                  tags={TAG_KIND: "trial", TAG_TRIAL: "0",
                                        TAG_SEARCH: search_run})
    tracker.end(trial_run, "FAILED")

    result = nas("export", "--experiment", "broken", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert result.output == (f"Error: experiment 'broken': the search {search_run} has no "
                             f"finished trial yet\n")

    result = nas("export", "--run", trial_run, "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert result.output == (f"Error: --run: trial 0 ({trial_run}) is FAILED, not FINISHED; "
                             f"it has no trained model to export\n")
    assert not (tmp_path / "x").exists()
