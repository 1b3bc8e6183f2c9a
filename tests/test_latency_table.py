"""A candidate's latency predicted from a per-layer table (issue 23): measured once per
machine, engine and threads, cached; the guard of --max-latency-ms; tables measured on
another device (--latency-table, `nas latency-table`); `nas space show --max-latency-ms`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from nas import latency
from nas.cli import main
from nas.latency_table import (LatencyGuard, LatencyTable, LatencyTableError, cache_path,
                               key, space_layers)
from nas.space import sample
from nas.specs import load_space

DIGITS = ((8, 8, 1), 10, 16.0)  # the digits pipeline's input shape, classes, pixel scale


def candidates(count: int, seed: int = 0):
    found, _ = sample(load_space("tiny"), *DIGITS[:2], count, seed, pixel_scale=DIGITS[2])
    return found


def eights(architecture) -> int:
    """How many of a tiny candidate's stages have 8 filters."""
    values = architecture.values
    return sum(values[f"stage_{n}/filters"] == 8 for n in range(1, values["depth"] + 1))


def phone_table(path, conv8_ms: float = 1.0, others_ms: float = 0.0) -> dict:
    """A table of every layer of `tiny` on digits, as if timed on a phone: a conv of 8
    filters takes `conv8_ms`, a 5x5 conv of 4 and a pool `others_ms`, every other layer
    nothing, the empty model 0.25 ms."""
    def ms(layer) -> float:
        if layer.kind == "Conv2D":
            return conv8_ms if layer.config["filters"] == 8 else (
                others_ms if layer.config["kernel_size"] == 5 else 0.0)
        return others_ms if layer.kind == "MaxPooling2D" else 0.0

    layers = {key: ms(entry.layer)
              for key, entry in space_layers(load_space("tiny"), *DIGITS).items()}
    data = {"format": "nas latency table 1", "machine": "phone", "engine": "tflite",
            "threads": 1, "overhead_ms": 0.25, "layers": layers}
    path.write_text(json.dumps(data))
    return data


def test_a_table_is_measured_once_per_machine_engine_and_threads_and_cached(tmp_path):
    (candidate,) = candidates(1)
    measured = []

    def grow(table, entries):  # nas.latency.measure_layers, counting what it measures
        measured.append(len(entries))
        latency.measure_layers(table, entries, runs=20)

    first = LatencyGuard(LatencyTable.cached("tflite", 1), 1.0, grow)
    predicted = first.predict(candidate)
    layers = len(candidate.for_serving().layers)
    assert measured == [layers] and predicted > 0
    path = cache_path("tflite", 1)
    assert path.parent == tmp_path / "cache" / "nas" / "latency"
    assert path.name.endswith("-tflite-1.json")
    saved = json.loads(path.read_text())
    assert saved["engine"] == "tflite" and saved["threads"] == 1
    assert len(saved["layers"]) == layers and saved["overhead_ms"] > 0

    again = LatencyGuard(LatencyTable.cached("tflite", 1), 1.0, grow)
    assert again.predict(candidate) == pytest.approx(predicted)
    assert measured == [layers]  # the second prediction measured nothing
    # another thread count, another engine: another table, nothing in it yet
    for engine, threads in (("tflite", 2), ("keras", 1)):
        other = LatencyTable.cached(engine, threads)
        assert other.path != path and len(other.missing(candidate)) == len(candidate.layers)


def test_predicting_from_a_cached_table_imports_no_tensorflow(tmp_path):
    data = phone_table(tmp_path / "phone.json")
    path = cache_path("tflite", 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**data, "machine": "this one"}))
    code = ("import sys\n"
            "from nas.latency_table import LatencyGuard, LatencyTable\n"
            "from nas.space import sample\nfrom nas.specs import load_space\n"
            "found, _ = sample(load_space('tiny'), (8, 8, 1), 10, 20, pixel_scale=16.0)\n"
            "guard = LatencyGuard(LatencyTable.cached('tflite', 1), 1.5)\n"
            "print(sum(guard.rejection(a) is not None for a in found))\n"
            "from nas.cli import main\n"
            "try:\n"
            "    main(['space', 'show', 'tiny', '--samples', '0', '--max-latency-ms', '1.5'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rejected = done.stdout.splitlines()[0]
    assert rejected == str(sum(eights(a) * 1.0 + 0.25 > 1.5 for a in candidates(20)))
    assert "measuring" not in done.stdout  # every layer was in the table


def test_a_candidate_predicted_over_the_budget_is_rejected_with_the_reason(tmp_path):
    from nas.specs import Constraints
    from nas.tuning import CandidateModel

    phone_table(tmp_path / "phone.json", conv8_ms=0.56)
    guard = LatencyGuard(LatencyTable.load(tmp_path / "phone.json"), 0.5)
    hypermodel = CandidateModel(load_space("tiny"), *DIGITS)
    found = candidates(30)
    over = [a for a in found if eights(a) >= 1]
    within = [a for a in found if eights(a) == 0]
    assert over and within and any(eights(a) == 1 for a in over)
    for architecture in over:
        rejection = hypermodel.check(architecture.values, Constraints(), guard)
        assert rejection.kind == "max_latency_ms" and rejection.over_budget
        assert str(rejection) == {1: "predicted 0.81 ms > max_latency_ms 0.5",
                                  2: "predicted 1.37 ms > max_latency_ms 0.5"}[eights(
                                      architecture)]
    for architecture in within:
        assert hypermodel.check(architecture.values, Constraints(), guard) is None
    # the cheaper budgets are checked first: a candidate over max_params is rejected as such
    rejection = hypermodel.check(over[0].values, Constraints(max_params=10), guard)
    assert rejection.kind == "max_params"


def test_a_fixed_table_never_measures_and_names_a_layer_it_lacks(tmp_path):
    data = phone_table(tmp_path / "phone.json")
    (candidate,) = candidates(1)
    first = candidate.for_serving().layers[1]  # the first conv: input 8x8x1
    lacking = key(first, ((8, 8, 1),))
    del data["layers"][lacking]
    (tmp_path / "phone.json").write_text(json.dumps(data))
    guard = LatencyGuard(LatencyTable.load(tmp_path / "phone.json"), 1.0)
    with pytest.raises(LatencyTableError) as raised:
        guard.predict(candidate)
    assert str(raised.value) == (f"{tmp_path / 'phone.json'}: no entry for the layer "
                                 f"stage_1/conv (Conv2D {first.describe()} on 8x8x1); key: "
                                 f"{lacking}")


def bad_tables(tmp_path):
    good = phone_table(tmp_path / "good.json")
    (tmp_path / "truncated.json").write_text('{"machine": "phone", ')
    (tmp_path / "negative.json").write_text(json.dumps(
        {**good, "overhead_ms": -1}))
    lacking = {**good, "layers": {k: v for k, v in good["layers"].items()
                                  if not k.startswith("Rescaling ")}}
    (tmp_path / "lacking.json").write_text(json.dumps(lacking))
    return [
        ("missing.json", "missing.json: no such latency table file"),
        ("truncated.json", "truncated.json: not a latency table (not valid JSON)"),
        ("negative.json", "negative.json: not a latency table (overhead_ms: -1 is not a "
                          "latency in ms (a number, at least 0))"),
        ("lacking.json", "lacking.json: no entry for the layer rescaling (Rescaling x 0.0625 "
                         "on 8x8x1); key: Rescaling {\"offset\":0.0,\"scale\":0.0625} 8x8x1"),
    ]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.new_store
def test_a_bad_latency_table_is_refused_in_one_line_before_anything_is_written(tmp_path,
                                                                             case):
    name, message = bad_tables(tmp_path)[case]
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--pipeline", "digits",
                                       "--max-latency-ms", "1", "--latency-table", name])
    assert result.exit_code == 2
    assert result.output == f"Error: {message}\n"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".nas").exists()
    assert not (tmp_path / "cache" / "nas").exists()


def test_a_latency_table_without_a_latency_budget_is_refused(tmp_path):
    phone_table(tmp_path / "phone.json")
    for command in (["search", "--space", "tiny"], ["space", "show", "tiny"]):
        result = CliRunner().invoke(main, [*command, "--latency-table", "phone.json"],
                                    prog_name="nas")
        assert result.exit_code == 2
        assert result.output.startswith(
            "Error: --latency-table is for --max-latency-ms: give it too")
        assert result.output.count("\n") == 1


def test_space_show_says_how_many_sampled_candidates_a_table_predicts_within(tmp_path):
    phone_table(tmp_path / "phone.json")
    result = CliRunner().invoke(main, ["space", "show", "tiny", "--samples", "0",
                                       "--max-latency-ms", "1.5", "--latency-table",
                                       "phone.json", "--latency-samples", "40", "--seed", "3"])
    assert result.exit_code == 0, result.output
    found = candidates(40, seed=3)
    within = sum(0.25 + eights(a) <= 1.5 for a in found)
    assert 0 < within < 40
    assert result.output.splitlines()[-1] == (
        f"latency            {within} of 40 sampled candidates (seed 3) predicted within "
        f"1.5 ms: an estimate from a sample, not a count (table phone.json, measured on "
        f"phone, TFLite, 1 thread; predicted 0.25 to 2.25 ms)")


def test_space_show_measures_what_this_machines_table_lacks_once(tmp_path):
    command = ["space", "show", "tiny", "--samples", "0", "--max-latency-ms", "1",
               "--latency-samples", "2"]
    first = CliRunner().invoke(main, command)
    assert first.exit_code == 0, first.output
    path = cache_path("tflite", 1)
    lacking = len({entry.key for a in candidates(2)
                   for entry in LatencyTable("tflite", 1, "").missing(a.for_serving())})
    assert (f"measuring {lacking} layers this machine's latency table lacks, each as a "
            f"model of it alone ({path})") in first.output
    assert len(json.loads(path.read_text())["layers"]) == lacking
    again = CliRunner().invoke(main, command)
    assert again.exit_code == 0, again.output
    assert "measuring" not in again.output
    assert again.output.splitlines()[-1] == first.output.splitlines()[-1]
    assert "2 of 2 sampled candidates (seed 0) predicted within 1 ms" in again.output


def test_layer_models_exported_and_timed_elsewhere_make_a_table(tmp_path):
    space = tmp_path / "one.yaml"
    space.write_text("name: one\nstages: {depth: 1, conv: {filters: 4, kernel_size: 3}}\n"
                     "head: {reduce: flatten}\noptimizer: {name: adam, learning_rate: 0.01}\n")
    result = CliRunner().invoke(main, ["latency-table", "export", "models", "--space",
                                       str(space)])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "models" / "layers.json").read_text())
    needed = space_layers(load_space(str(space)), *DIGITS)
    assert sorted(index.values()) == sorted(needed)
    files = sorted(p.name for p in (tmp_path / "models").glob("*.tflite"))
    assert files == sorted([*index, "empty.tflite"])
    # benchmark_model's "Inference (avg)" in microseconds, one line per model
    (tmp_path / "times.txt").write_text("".join(
        f"models/{name} {100 + 50 * n}\n" for n, name in enumerate(files)))
    made = CliRunner().invoke(main, ["latency-table", "import", "models", "times.txt",
                                     "--machine", "board", "--out", "board.json"])
    assert made.exit_code == 0, made.output
    table = LatencyTable.load(tmp_path / "board.json")
    assert table.machine == "board" and table.overhead_ms == pytest.approx(
        (100 + 50 * files.index("empty.tflite")) / 1000)
    assert set(table.entries) == set(needed)
    shown = CliRunner().invoke(main, ["space", "show", str(space), "--samples", "0",
                                      "--max-latency-ms", "5", "--latency-table",
                                      "board.json"])
    assert shown.exit_code == 0, shown.output
    assert "table board.json, measured on board, TFLite, 1 thread" in shown.output

    (tmp_path / "short.txt").write_text(f"models/{files[0]} 100\n")
    refused = CliRunner().invoke(main, ["latency-table", "import", "models", "short.txt",
                                        "--machine", "board", "--out", "short.json"])
    assert refused.exit_code == 2
    assert refused.output.startswith("Error: short.txt: no timing of ")
    assert refused.output.count("\n") == 1 and not (tmp_path / "short.json").exists()


@pytest.mark.slow
def test_a_search_trains_only_candidates_its_table_predicts_within_the_budget(tmp_path):
    from mlflow import MlflowClient

    data = phone_table(tmp_path / "phone.json", conv8_ms=1.0, others_ms=1.0)
    result = CliRunner().invoke(main, [
        "search", "--space", "tiny", "--pipeline", "digits", "--epochs", "1",
        "--max-trials", "2", "--experiment", "phone", "--max-latency-ms", "1",
        "--latency-table", "phone.json", "--ensemble", "1", "--no-progress",
        "--tuner", "random"])
    assert result.exit_code == 0, result.output
    assert (f"latency budget: candidates predicted over --max-latency-ms are not trained "
            f"(per-layer table phone.json, {len(data['layers'])} layers, measured on phone)"
            ) in result.output
    client = MlflowClient()
    experiment = client.get_experiment_by_name("phone")
    runs = client.search_runs([experiment.experiment_id])
    (search,) = [r for r in runs if r.data.tags.get("nas.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("nas.kind") == "trial"]
    assert len(trials) == 2
    for run in trials:  # only 3x3 convs of 4 filters, no pool: 0.25 + 1 ms is over
        params = run.data.params
        for n in range(1, int(params["depth"]) + 1):
            assert (params[f"stage_{n}/filters"], params[f"stage_{n}/kernel_size"],
                    params[f"stage_{n}/pool"]) == ("4", "3", "none")
    rejected = search.data.metrics["rejected_candidates"]
    assert rejected > 0
    assert f"{int(rejected)} candidate" in result.output
    logged = json.loads((tmp_path / client.download_artifacts(
        search.info.run_id, "latency_table.json", str(tmp_path))).read_text())
    assert logged["machine"] == "phone" and logged["layers"] == data["layers"]
    assert not (tmp_path / "cache" / "nas").exists()  # nothing measured on this machine
