"""Reading searches back from MLflow: `nas trials`, `nas best`, `nas ui`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from click.testing import CliRunner

from nas import results
from nas.cli import main
from nas.tracking import TAG_FINAL, TAG_KIND, TAG_REFIT, TAG_SEARCH, TAG_TRIAL, Tracker


def nas(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def lines(output: str) -> list[str]:
    return output.strip().splitlines()


@pytest.mark.parametrize("command", ["trials", "best", "ui", "export"])
def test_help(command):
    result = nas(command, "--help")
    assert result.exit_code == 0
    assert f" {command} [OPTIONS]" in result.output.splitlines()[0]


@pytest.mark.slow
def test_trials_lists_every_trial_best_first(digits_search):
    result = nas("trials", "--tracking-uri", digits_search.tracking_uri)  # the latest search

    assert result.exit_code == 0, result.output
    header, columns, *rows = lines(result.output)
    search = digits_search.result
    assert header == (f"experiment 'shared', search run {search.search_run_id} (FINISHED): "
                      f"3 of 3 trials; val_accuracy, higher is better")
    assert columns.split() == ["trial", "status", "val_accuracy", "params", "FLOPs", "fit",
                               "s", "epochs", "depth", "filters", "kernels", "strides", "pool",
                               "1x1"]
    assert [row.split()[0] for row in rows] == [t.trial_id for t in search.finished]
    for row, trial in zip(rows, search.finished):
        cells = row.split()
        assert cells[1:5] == ["FINISHED", f"{trial.objective:.4f}", f"{trial.params:,}",
                              f"{trial.flops:,}"]
        a = trial.architecture
        assert cells[7:] == [str(a["depth"]), ",".join(map(str, a["filters"])),
                             ",".join(map(str, a["kernels"])), ",".join(map(str, a["strides"])),
                             ",".join(a["pooling"]),
                             ",".join("y" if p else "n" for p in a["pointwise"])]


def _search(tags=None) -> results.Search:
    return results.Search(experiment_id="1", experiment_name="toy", run_id="s", status="FINISHED",
                          params={"objective": "val_accuracy"}, metrics={}, tags=tags or {},
                          tracking_uri="sqlite:///toy.db")


def _row(trial_id, status, objective=None, params=None, flops=None) -> results.TrialRow:
    metrics = {k: v for k, v in (("objective", objective), ("params", params),
                                 ("flops", flops)) if v is not None}
    return results.TrialRow(trial_id=trial_id, run_id=f"run-{trial_id}", status=status,
                            objective=objective, params=params, flops=flops, fit_seconds=None,
                            epochs=None, values={}, metrics=metrics)


def test_select_trials_filters_marks_sorts_and_limits():
    search = _search()
    rows = [_row("0", "FINISHED", 0.9, 1000, 1500), _row("1", "FINISHED", 0.8, 500, 2000),
            _row("2", "FAILED"), _row("3", "FINISHED", 0.7, 800, 9000), _row("4", "RUNNING")]

    def select(**options):
        shown, marks = results.select_trials(rows, search, **options)
        return [r.trial_id for r in shown], marks

    assert select() == (["0", "1", "3", "2", "4"], {})  # best first, unscored last
    assert select(status="failed") == (["2"], {})
    assert select(status="KILLED") == ([], {})
    # Trial 3 is beaten by trial 1 on both costs; trial 1 by trial 0 on FLOPs only.
    assert select(pareto=True) == (["0", "1"], {"run-0": "params,flops", "run-1": "params"})
    assert select(pareto=True, sort="params") == (["1", "0"],
                                                  {"run-1": "params", "run-0": "params,flops"})
    assert select(sort="params", limit=2) == (["1", "3"], {})
    assert select(sort="trial", limit=3) == (["0", "1", "2"], {})
    assert select(status="finished", sort="flops", limit=1) == (["0"], {})
    with pytest.raises(results.ResultsError, match=r"^sort: 'speed' is not one of \["):
        select(sort="speed")
    with pytest.raises(results.ResultsError,
                       match=r"^status: 'done' is not one of \['FINISHED', 'FAILED', 'KILLED', "
                             r"'RUNNING'\]$"):
        select(status="done")


def test_a_search_names_its_final_model_from_its_tags():
    assert (_search().final_trials, _search().refit) == ([], False)
    search = _search({TAG_FINAL: "3,1", TAG_REFIT: "1"})
    assert (search.final_trials, search.refit) == (["3", "1"], True)
    assert results.finished_trials([_row("0", "FAILED"), _row("1", "FINISHED", 0.5),
                                    _row("2", "FINISHED")]) == [_row("1", "FINISHED", 0.5)]


@pytest.mark.slow
def test_trials_sort_limit_and_status(digits_search):
    uri = digits_search.tracking_uri
    result = nas("trials", "--experiment", "shared", "--sort", "params", "--limit", "2",
                 "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    rows = lines(result.output)[2:]
    by_size = sorted(digits_search.result.trials, key=lambda t: (t.params, t.trial_id))
    assert [r.split()[0] for r in rows] == [t.trial_id for t in by_size[:2]]

    result = nas("trials", "--status", "failed", "--tracking-uri", uri)
    assert result.exit_code == 0
    assert lines(result.output)[1:] == ["no trial is FAILED"]

    result = nas("trials", "--sort", "speed", "--tracking-uri", uri)
    assert result.exit_code == 2
    assert result.output.startswith("Error: --sort: 'speed' is not one of ['accuracy', ")


@pytest.mark.slow
def test_best_shows_scores_layer_table_and_where_it_is(digits_search):
    result = nas("best", "--experiment", "shared", "--tracking-uri", digits_search.tracking_uri)

    assert result.exit_code == 0, result.output
    best = digits_search.result.best
    out = lines(result.output)
    assert out[0] == (f"best trial {best.trial_id} of experiment 'shared': val_accuracy "
                      f"{best.objective:.4f} (3 finished trials)")
    assert out[1].startswith(f"{best.params:,} parameters, {best.flops:,} FLOPs, fit ")
    test = digits_search.result.test
    assert out[2] == (f"final model: trial {best.trial_id}, test_accuracy "
                      f"{test['test_accuracy']:.4f}  test_loss {test['test_loss']:.4f}  on 359 "
                      f"held-out samples the search never saw")
    assert out[3].startswith(f"hyperparameters: depth={best.architecture['depth']}  ")
    table = out[out.index("") + 1:]
    assert table[0].split() == ["layer", "type", "output", "shape", "params", "FLOPs"]
    assert table[2].split()[:3] == ["rescaling", "Rescaling", "x"]
    total = next(line for line in table if line.startswith("total"))
    assert total.split() == ["total", f"{best.params:,}", f"{best.flops:,}"]
    assert f"MLflow: trial run {best.run_id}, search run {digits_search.result.search_run_id}" \
        in result.output
    assert (f"  model:     runs:/{digits_search.result.search_run_id}/model (the final model: "
            f"trial {best.trial_id})") in out
    # On its training runs: MLflow 3.17's UI opens the GenAI view unless a link says so.
    assert (f"  UI:        http://127.0.0.1:5000/#/experiments/"
            f"{digits_search.result.experiment_id}/runs/{best.run_id}"
            f"?workflowType=machine_learning  (start it with `nas ui`)") in out


@pytest.mark.slow
def test_trials_and_best_do_not_import_tensorflow(digits_search):
    script = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from nas.cli import main
        for command in ("trials", "best"):
            result = CliRunner().invoke(main, [command, "--tracking-uri",
                                               {digits_search.tracking_uri!r}])
            assert result.exit_code == 0, result.output
        print(sorted(m for m in ("tensorflow", "keras", "keras_tuner") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_unknown_experiment_is_one_line_exit_2(digits_search):
    for command in ("trials", "best"):
        result = nas(command, "--experiment", "nope", "--tracking-uri",
                     digits_search.tracking_uri)
        assert result.exit_code == 2
        assert result.output == (f"Error: --experiment: no experiment 'nope' in "
                                 f"{digits_search.tracking_uri} (it holds: 'shared')\n")


@pytest.mark.new_store
def test_an_empty_store_says_to_search_first(tmp_path):
    result = nas("trials")
    assert result.exit_code == 2
    assert result.output == (f"Error: --tracking-uri: sqlite:///{tmp_path}/mlflow.db does not "
                             f"exist (no search was logged there); run `nas search` first, or "
                             f"give --tracking-uri / MLFLOW_TRACKING_URI\n")
    assert not (tmp_path / "mlflow.db").exists()


def _search_without_finished_trial(name: str) -> str:
    """A search whose only trial failed, written as `nas search` writes it."""
    tracker = Tracker()
    experiment_id = tracker.experiment_id(name)
    search_run = tracker.start_run(experiment_id, "search", tags={TAG_KIND: "search"})
    tracker.log_params(search_run, {"objective": "val_accuracy", "max_trials": 2})
    trial_run = tracker.start_run(experiment_id, "trial-0", parent_run_id=search_run,
                                  tags={TAG_KIND: "trial", TAG_TRIAL: "0",
                                        TAG_SEARCH: search_run,
                                        "nas.error": "ValueError: the loss became nan"})
    tracker.log_params(trial_run, {"depth": 1})
    tracker.end(trial_run, "FAILED")
    tracker.end(search_run, "FAILED")
    return search_run


def test_no_finished_trial(tmp_path):
    search_run = _search_without_finished_trial("broken")

    result = nas("best", "--experiment", "broken")
    assert result.exit_code == 2
    assert result.output == (f"Error: experiment 'broken': the search {search_run} has no "
                             f"finished trial yet\n")

    result = nas("trials", "--experiment", "broken")
    assert result.exit_code == 0
    assert lines(result.output)[-1] == "trial 0 FAILED: ValueError: the loss became nan"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_store_on_localhost(digits_search, tmp_path):
    port = _free_port()
    log = open(tmp_path / "ui.log", "w+")
    # Its own process group, so that the server's workers stop with it.
    process = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "ui", "--port", str(port),
         "--tracking-uri", digits_search.tracking_uri],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = (f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
               f"?experiment_name=shared")
        deadline, body = time.monotonic() + 90, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = response.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        log.seek(0)
        output = log.read()
        assert body is not None, output
        assert '"name": "shared"' in body or '"name":"shared"' in body
        # ... without MLflow's job runner (its huey consumers), which browsing runs needs
        # not: with it, the server takes twice as long to answer
        listed = subprocess.run(["ps", "-e", "-o", "pgid=,args="], capture_output=True,
                                text=True).stdout.splitlines()
        group = [line for line in listed if line.split()[0] == str(process.pid)]
        assert group and not any("huey" in line or "jobs" in line for line in group), group
        assert output.startswith(
            f"MLflow UI of {digits_search.tracking_uri} on http://127.0.0.1:{port} (Ctrl-C "
            f"stops it)\n  the latest search (experiment 'shared'): http://127.0.0.1:{port}/#/"
            f"experiments/{digits_search.result.experiment_id}/runs"
            f"?workflowType=machine_learning\n")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_ui_refuses_a_server_store():
    result = nas("ui", "--tracking-uri", "http://127.0.0.1:5000")
    assert result.exit_code == 2
    assert result.output == ("Error: --tracking-uri: http://127.0.0.1:5000 is an MLflow server "
                             "already; open it in a browser\n")


@pytest.mark.parametrize("command", [["trials"], ["best"], ["report", "--out", "p.png"]])
def test_an_unreachable_server_is_one_line_at_once(command):
    result = CliRunner().invoke(main, [*command, "--tracking-uri", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: --tracking-uri: http://127.0.0.1:9 cannot be reached")
    assert len(result.output.splitlines()) == 1
