"""`--ensemble K`: the final model averages the best K trials, in one model everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from nas import results
from nas.architecture import Architecture
from nas.data import load_arrays
from nas.models import build_model
from nas.specs import load_pipeline, load_space
from nas.tracking import Tracker
from nas.cli import main

pytestmark = pytest.mark.slow  # every test here reads one search that trains


def nas(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    uri = f"sqlite:///{root}/mlflow.db"
    common = ["--tracking-uri", uri, "--workdir", root / ".nas"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = nas("search", "--space", "tiny", "--max-trials", "4", "--epochs", "2",
                     "--ensemble", "3", "--experiment", "ens", *common)
    assert result.exit_code == 0, result.output
    tracker = Tracker(uri)
    search = results.find_search(tracker, "ens")
    ranked = [r for r in results.sort_trials(results.list_trials(tracker, search),
                                               "objective", search)][:3]
    members = []
    for row in ranked:  # each member rebuilt from its params and KerasTuner's checkpoint
        model = build_model(Architecture.from_values(load_space("tiny"), row.values,
                                                     (8, 8, 1), 10, 16.0))
        model.load_weights(f"{root}/.nas/ens/trial_{row.trial_id}/checkpoint.weights.h5")
        members.append(model)
    arrays = load_arrays(load_pipeline("digits"))
    return dict(root=root, uri=uri, common=common, output=result.output, search=search,
                ranked=ranked, members=members, arrays=arrays)


def average(members, x):
    return np.mean([m.predict(x, verbose=0) for m in members], axis=0)


def test_the_final_model_is_the_average_of_the_best_three_and_is_scored_once(ensembled):
    ids = [r.trial_id for r in ensembled["ranked"]]
    search, arrays = ensembled["search"], ensembled["arrays"]
    assert search.tags["nas.final_trials"] == ",".join(ids)
    expected = average(ensembled["members"], arrays.x_test)
    accuracy = float(np.mean(expected.argmax(axis=1) == arrays.y_test))
    assert search.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert (f"final model: ensemble of trials {', '.join(ids)} (their probabilities "
            f"averaged), test_accuracy {accuracy:.4f}") in ensembled["output"]
    assert f"model of the ensemble of trials {', '.join(ids)} logged to MLflow" in \
        ensembled["output"]
    shown = nas("best", "--experiment", "ens", "--tracking-uri", ensembled["uri"])
    assert f"final model: ensemble of trials {', '.join(ids)}" in shown.output


def test_the_mlflow_model_and_the_export_predict_the_average(ensembled, tmp_path, monkeypatch):
    import mlflow.pyfunc

    x = ensembled["arrays"].x_test[:40]
    expected = average(ensembled["members"], x)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ensembled["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{ensembled['search'].run_id}/model")
    np.testing.assert_allclose(np.asarray(pyfunc.predict(x)), expected, atol=1e-5)

    out = tmp_path / "final"
    result = nas("export", "--experiment", "ens", "--out", out, *ensembled["common"])
    assert result.exit_code == 0, result.output
    ids = [r.trial_id for r in ensembled["ranked"]]
    assert result.output.startswith(f"exported ensemble of trials {', '.join(ids)} (their "
                                    f"probabilities averaged) (the search's final model)")
    assert "  test score:  test_accuracy" in result.output
    served = tf.saved_model.load(str(out)).signatures["serving_default"]
    assert list(served.structured_input_signature[1]) == ["image"]
    (probabilities,) = served(image=tf.constant(x)).values()
    np.testing.assert_allclose(probabilities.numpy(), expected, atol=1e-5)
    written = json.loads((out / "class_names.json").read_text())
    assert written["ensemble"] == ids and written["trial_id"] is None
    assert written["test"]["test_accuracy"] == ensembled["search"].metrics["test_accuracy"]


def test_one_trial_or_the_best_alone_on_request(ensembled, tmp_path):
    best, second = ensembled["ranked"][0], ensembled["ranked"][1]
    x = ensembled["arrays"].x_test[:40]
    for flags, row, member in ((["--ensemble", "1"], best, 0), (["--trial", second.trial_id],
                                                                second, 1)):
        out = tmp_path / "-".join(flags)
        result = nas("export", "--experiment", "ens", "--out", out, *flags,
                     *ensembled["common"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"exported trial {row.trial_id} of experiment 'ens'")
        assert "test score" not in result.output  # only the final model was scored
        served = tf.saved_model.load(str(out)).signatures["serving_default"]
        (probabilities,) = served(image=tf.constant(x)).values()
        np.testing.assert_allclose(probabilities.numpy(),
                                   ensembled["members"][member].predict(x, verbose=0),
                                   atol=1e-5)
    refused = nas("export", "--experiment", "ens", "--out", tmp_path / "x", "--trial", "99",
                  *ensembled["common"])
    assert refused.exit_code == 2
    assert "--trial: experiment 'ens' has no trial '99'" in refused.output
