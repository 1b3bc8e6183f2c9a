"""A model's latency measured on this machine (issue 23): each trial's and the final
model's, logged and shown; what cannot be measured is a note, not a failed trial."""

from __future__ import annotations

import keras
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas import latency
from nas.cli import main


def convnet(size: int, filters: int) -> keras.Model:
    return keras.Sequential([
        keras.Input((size, size, 1)), keras.layers.Conv2D(filters, 3, padding="same"),
        keras.layers.Conv2D(filters, 3, padding="same"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax")])


@pytest.mark.parametrize("engine", latency.ENGINES)
def test_a_larger_model_measures_slower_at_batch_size_1(engine):
    small = latency.measure(convnet(8, 4), engine, runs=30)
    large = latency.measure(convnet(64, 64), engine, runs=30)  # ~2,000x the FLOPs
    for measured in (small, large):
        assert measured.engine == engine and measured.threads == 1
        assert measured.median_ms > 0 and measured.spread_ms >= 0 and measured.runs >= 30
    assert large.median_ms > 3 * small.median_ms
    assert large.metrics() == {"latency_ms": large.median_ms,
                               "latency_spread_ms": large.spread_ms}
    assert large.describe().startswith(f"{large.median_ms:.3f} ms at batch size 1 (")


def test_bad_engines_and_threads_are_refused():
    with pytest.raises(ValueError, match="unknown latency engine 'onnx'"):
        latency.measure(convnet(8, 4), "onnx")
    with pytest.raises(ValueError, match="threads: 0 must be at least 1"):
        latency.measure(convnet(8, 4), "tflite", threads=0)


def runs(experiment: str):
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    every = client.search_runs([found.experiment_id], max_results=100)
    (search,) = [r for r in every if r.data.tags.get("nas.kind") == "search"]
    return search, [r for r in every if r.data.tags.get("nas.kind") == "trial"]


@pytest.mark.slow
def test_a_search_with_latency_logs_and_shows_each_trials_and_the_final_models(tmp_path):
    result = CliRunner().invoke(main, [
        "search", "--space", "tiny", "--pipeline", "digits", "--epochs", "1",
        "--max-trials", "3", "--experiment", "timed", "--latency", "--latency-threads", "2",
        "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "final model latency: " in result.output
    assert "(TFLite, 2 threads; " in result.output and " runs timed, spread " in result.output
    search, trials = runs("timed")
    assert len(trials) == 3
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["latency_ms"] > 0 and "latency_spread_ms" in run.data.metrics
    assert search.data.metrics["latency_ms"] > 0  # the final model, an ensemble of 3
    assert (search.data.params["latency"], search.data.params["latency_threads"]) == (
        "tflite", "2")

    shown = CliRunner().invoke(main, ["trials", "--experiment", "timed", "--sort", "latency"])
    assert shown.exit_code == 0, shown.output
    header, *lines = shown.output.splitlines()[1:]
    assert "latency ms" in header
    measured = {r.data.tags["nas.trial_id"]: r.data.metrics["latency_ms"] for r in trials}
    assert [line.split()[0] for line in lines] == sorted(measured, key=measured.get)
    best = CliRunner().invoke(main, ["best", "--experiment", "timed"])
    assert best.exit_code == 0, best.output
    assert ", latency " in best.output.splitlines()[1]
    assert "final model latency: " in best.output and "(TFLite, 2 threads; spread " in (
        best.output)


@pytest.mark.slow
def test_a_model_whose_latency_cannot_be_measured_is_noted_and_its_trial_kept(monkeypatch):
    def cannot(model, engine, threads):
        raise RuntimeError("some op TFLite cannot convert")

    monkeypatch.setattr(latency, "measure", cannot)
    result = CliRunner().invoke(main, [
        "search", "--space", "tiny", "--pipeline", "digits", "--epochs", "1",
        "--max-trials", "1", "--experiment", "untimed", "--latency", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert ("warning: the final model's latency could not be measured (RuntimeError: some "
            "op TFLite cannot convert)") in result.output
    search, trials = runs("untimed")
    for run in [search, *trials]:
        assert "latency_ms" not in run.data.metrics
        assert run.data.tags["nas.latency_error"] == "RuntimeError: some op TFLite cannot convert"
    assert all(run.info.status == "FINISHED" for run in trials)
    assert "test_accuracy" in search.data.metrics  # the final model made and scored anyway


@pytest.mark.slow
def test_a_latency_budget_keeps_slower_trials_out_of_the_final_model_and_shrinks_it(
        monkeypatch):
    def measure(model, engine, threads, runs=latency.RUNS):
        # A model: 1 ms per 1,000 parameters, known and repeatable. A layer alone, and the
        # empty model (the per-layer table's, `nas.models.layer_model`): nothing, so the
        # table predicts every candidate within the budget and only the measurement after
        # training tells.
        ms = 0.0 if model.name in ("layer", "empty") else model.count_params() / 1000
        return latency.Latency(engine, threads, ms, 0.0, 100)

    monkeypatch.setattr(latency, "measure", measure)
    result = CliRunner().invoke(main, [
        "search", "--space", "tiny", "--pipeline", "digits", "--epochs", "1",
        "--max-trials", "4", "--experiment", "budget", "--max-latency-ms", "3.5",
        "--no-progress"])
    assert result.exit_code == 0, result.output
    search, trials = runs("budget")
    assert search.data.params["latency"] == "tflite"  # the budget measures, as TFLite
    ms = {r.data.tags["nas.trial_id"]: r.data.metrics["latency_ms"] for r in trials}
    over = {t for t, v in ms.items() if v > 3.5}
    assert over and len(over) < len(ms)  # the space's candidates fall on both sides
    for run in trials:
        trial = run.data.tags["nas.trial_id"]
        assert ("nas.over_budget" in run.data.tags) == (trial in over)
        assert run.info.status == "FINISHED"
    for trial in over:
        assert (f"trial {trial} is over the latency budget (latency {ms[trial]:.4g} ms > "
                f"3.5 ms): never chosen") in result.output
    # the final model: the best trials within the budget, as many (up to 3) as fit in it
    final = search.data.tags["nas.final_trials"].split(",")
    within = sorted((r for r in trials if r.data.tags["nas.trial_id"] not in over),
                    key=lambda r: -r.data.metrics["objective"])
    ranked = [r.data.tags["nas.trial_id"] for r in within]
    assert final == ranked[:len(final)]
    assert search.data.metrics["latency_ms"] == pytest.approx(sum(ms[t] for t in final))
    assert search.data.metrics["latency_ms"] <= 3.5
    if len(final) < min(3, len(ranked)):  # it shrank: one more member would break it
        assert sum(ms[t] for t in ranked[:len(final) + 1]) > 3.5
        assert f"over --max-latency-ms 3.5: without trial {ranked[len(final)]}" in (
            result.output)


@pytest.mark.parametrize("args, message", [
    (["--latency-threads", "2"], "--latency-threads is for --latency tflite: give it too"),
    (["--latency", "keras", "--latency-threads", "2"],
     "--latency-threads is for --latency tflite: give it too"),
    (["--latency", "tflite", "--latency-threads", "0"], "0 is not in the range x>=1"),
    (["--latency", "onnx"], "'onnx' is not one of 'tflite', 'keras'"),
    (["--max-latency-ms", "0"], "0 is not in the range x>0"),
    (["--max-latency-ms", "2", "--latency", "keras", "--latency-threads", "2"],
     "--latency-threads is for --latency tflite: give it too"),
])
@pytest.mark.new_store
def test_bad_latency_flags_are_refused_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--pipeline", "digits",
                                       *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".nas").exists()
