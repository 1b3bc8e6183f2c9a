"""Searches on Ray as the tests start and read them: `nas search --ray` processes
(`processes`), and what their runs in MLflow say."""

from __future__ import annotations

import time

from mlflow import MlflowClient

from processes import NAS, search_runs

TINY = ["--space", "tiny", "--pipeline", "digits"]
DEADLINE = 240  # seconds for one search of a few tiny trials on Ray, on 2 busy cores


def search(processes, name: str, uri: str, *options, experiment: str = "ray"):
    return processes.start(name, NAS + [
        "search", *TINY, "--epochs", "3", "--experiment", experiment, "--tracking-uri", uri,
        "--workdir", str(processes.folder / ".nas"), *options])


def finished(processes, name: str) -> str:
    """The output of the search `name`, which must end with exit code 0."""
    code = processes.wait(name, timeout=DEADLINE)
    assert code == 0, processes.logs()
    return processes.output(name)


def wait_for(processes, name: str, condition, what: str):
    """Call `condition` until it returns something true, and return that; the search
    `name` must run meanwhile."""
    deadline = time.monotonic() + DEADLINE
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} in {DEADLINE} s\n{processes.logs()}"
        assert processes.started[name].poll() is None, processes.logs()
        time.sleep(0.1)
    return found


def training(uri: str, experiment: str, workdir):
    """The run of a trial in the middle of its training: its first epoch is saved in the
    working folder (`nas.tuning` saves every epoch of a trial for a resume) and its run is
    RUNNING with its params written; else None."""
    saved = {p.parent.name.removeprefix("trial_")
             for p in (workdir / experiment).glob("trial_*/resume.json")}
    _, trials = search_runs(uri, experiment)
    return next((r for r in trials if r.info.status == "RUNNING" and r.data.params
                 and r.data.tags["nas.trial_id"] in saved), None)


def assert_each_trial_finished_once(trials: list, count: int) -> dict:
    """Every trial 0..count-1 has exactly one FINISHED run; none is left RUNNING. The
    FINISHED run of each trial, by trial id."""
    done = {}
    for run in trials:
        assert run.info.status != "RUNNING", run.data.tags
        if run.info.status == "FINISHED":
            trial_id = run.data.tags["nas.trial_id"]
            assert trial_id not in done, f"trial {trial_id} FINISHED twice"
            done[trial_id] = run
    assert sorted(done) == [str(n) for n in range(count)]
    return done


def curve(uri: str, run) -> list[tuple[int, float]]:
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "val_accuracy")
    return sorted((m.step, m.value) for m in history)
