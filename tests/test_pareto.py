"""Trade-offs: the Pareto front of objective vs cost, its plot, and the commands showing it."""

from __future__ import annotations

import math
import random

import pytest
from click.testing import CliRunner

from nas.cli import main
from nas.pareto import COSTS, costs_of, front_marks, pareto_front, plot_tradeoff

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TRIALS = [
    {"trial_id": "a", "objective": 0.90, "params": 1000, "flops": 5000},
    {"trial_id": "b", "objective": 0.95, "params": 3000, "flops": 4000},
    {"trial_id": "c", "objective": 0.80, "params": 500, "flops": 9000},
    {"trial_id": "d", "objective": 0.90, "params": 1500, "flops": 3000},  # a is as good, cheaper
    {"trial_id": "e", "objective": 0.95, "params": 3000, "flops": 4000},  # b's twin
    {"trial_id": "f", "objective": 0.85, "params": 2000, "flops": 2500},
    {"trial_id": "g", "objective": None, "params": 10, "flops": 10},  # failed: no objective
    {"trial_id": "h", "objective": math.nan, "params": 10, "flops": 10},
]


def ids(trials):
    return [t["trial_id"] for t in trials]


def test_the_front_of_accuracy_vs_parameters_and_vs_flops():
    assert ids(pareto_front(TRIALS, "params", "max")) == ["c", "a", "b", "e"]
    assert ids(pareto_front(TRIALS, "flops", "max")) == ["f", "d", "b", "e"]


def test_the_front_of_a_loss_prefers_the_lowest():
    losses = [{**t, "objective": None if t["objective"] is None else 1 - t["objective"]}
              for t in TRIALS]
    assert ids(pareto_front(losses, "params", "min")) == ["c", "a", "b", "e"]
    assert ids(pareto_front(TRIALS, "params", "min")) == ["c"]  # accuracy read as a loss


def test_marks_say_which_fronts_each_trial_is_on():
    assert front_marks(TRIALS, "max") == [
        ("params",), ("params", "flops"), ("params",), ("flops",), ("params", "flops"),
        ("flops",), (), ()]


def test_trials_as_objects_work_too():
    class Trial:
        def __init__(self, trial_id, objective, params, flops):
            self.trial_id, self.objective, self.params, self.flops = (
                trial_id, objective, params, flops)

    trials = [Trial(**t) for t in TRIALS]
    assert [t.trial_id for t in pareto_front(trials, "flops")] == ["f", "d", "b", "e"]


def test_the_front_is_what_no_other_trial_dominates():
    rng = random.Random(7)
    trials = [{"trial_id": str(i), "objective": rng.choice([0.1, 0.2, 0.3, 0.4]),
               "params": rng.randint(1, 6), "flops": 0} for i in range(60)]
    for direction, sign in (("max", 1), ("min", -1)):
        def dominated(t):
            return any(sign * o["objective"] >= sign * t["objective"]
                       and o["params"] <= t["params"]
                       and (sign * o["objective"], -o["params"]) != (sign * t["objective"],
                                                                     -t["params"])
                       for o in trials)
        expected = {t["trial_id"] for t in trials if not dominated(t)}
        assert set(ids(pareto_front(trials, "params", direction))) == expected


def test_a_measured_latency_is_a_third_front_of_the_trials_that_have_one():
    timed = [{**t, "latency": latency} for t, latency in
             zip(TRIALS, (0.5, 0.4, None, 0.2, 0.9, 0.1, 0.01, 0.01))]
    assert ids(pareto_front(timed, "latency", "max")) == ["f", "d", "b"]  # c: none measured
    assert front_marks(timed, "max") == [
        ("params",), ("params", "flops", "latency"), ("params",), ("flops", "latency"),
        ("params", "flops"), ("flops", "latency"), (), ()]
    assert costs_of(TRIALS) == ("params", "flops") and costs_of(timed) == COSTS


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"cost 'time' is not one of \['params', 'flops', "
                                         r"'latency'\]"):
        pareto_front(TRIALS, "time")
    with pytest.raises(ValueError, match=r"direction 'up' is not one of"):
        pareto_front(TRIALS, "params", "up")


def test_the_plot_is_a_real_png(tmp_path):
    path = plot_tradeoff(TRIALS, tmp_path / "plot.png", "val_accuracy", "max", title="t")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    empty = plot_tradeoff([], tmp_path / "empty.png", "val_loss", "min")
    assert empty.read_bytes().startswith(PNG_MAGIC)


# --- on a real search ------------------------------------------------------------------


@pytest.mark.slow
def test_the_search_run_carries_the_plot(digits_search):
    from mlflow import MlflowClient

    client = MlflowClient(digits_search.tracking_uri)
    run_id = digits_search.result.search_run_id
    assert "pareto.png" in [a.path for a in client.list_artifacts(run_id)]
    local = client.download_artifacts(run_id, "pareto.png", str(digits_search.root))
    with open(local, "rb") as f:
        assert f.read(8) == PNG_MAGIC


@pytest.mark.slow
def test_trials_pareto_shows_only_the_front_marked(digits_search):
    result = CliRunner().invoke(main, ["trials", "--pareto", "--experiment", "shared",
                                       "--tracking-uri", digits_search.tracking_uri])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines[1].split()
    assert header[0] == "trial" and header[-1] == "pareto"
    shown = {line.split()[0]: line.split()[-1] for line in lines[2:]}
    finished = digits_search.result.finished
    marks = dict(zip([t.trial_id for t in finished], front_marks(finished, "max")))
    assert shown == {trial_id: ",".join(m) for trial_id, m in marks.items() if m}


@pytest.mark.slow
def test_report_writes_the_plot(digits_search, tmp_path):
    out = tmp_path / "tradeoff.png"
    result = CliRunner().invoke(main, ["report", "--experiment", "shared", "--out", str(out),
                                       "--tracking-uri", digits_search.tracking_uri])
    assert result.exit_code == 0, result.output
    front = pareto_front(digits_search.result.finished, "params", "max")
    assert result.output == (
        f"wrote {out}: val_accuracy of {len(digits_search.result.finished)} finished trials "
        f"against parameters and FLOPs; Pareto front (parameters): trials "
        f"{', '.join(t.trial_id for t in front)}\n")
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--out", "plot.txt"], "Error: Invalid value for --out: 'plot.txt' does not end in .png"),
    (["--out", "no/such/plot.png"], "Error: Invalid value for --out: 'no/such/plot.png': the "
                                    "folder 'no/such' does not exist"),
    (["--out", "plot.png", "--experiment", "nope"], "Error: --experiment: no experiment 'nope'"),
])
def test_report_refuses_bad_input_with_exit_code_2(digits_search, tmp_path, args, message):
    result = CliRunner().invoke(main, ["report", *args,
                                       "--tracking-uri", digits_search.tracking_uri])
    assert result.exit_code == 2
    assert message in result.output
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.new_store
def test_report_without_a_store_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["report", "--out", "plot.png"])
    assert result.exit_code == 2
    assert "does not exist (no search was logged there)" in result.output
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", [["space", "--help"], ["space", "show", "--help"],
                                     ["report", "--help"], ["trials", "--help"]])
def test_help(command):
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0 and "Usage:" in result.output
