"""A search's resume: the state it is found again by, and its KerasTuner state rebuilt.

A search is its run in the tracking store; its project folder (`SearchConfig.project_dir`)
caches where that run is in `nas_search.json` (`SearchState`) beside KerasTuner's own
state. `nas.search.prepare` finds the state (`saved_state`, else in the tracking store:
`find`) and refuses what cannot go on; `nas.search.run` goes on from it (`go_on`,
`write_state`) and opens the tuner, rebuilding KerasTuner's state from the search's trial
runs when it is missing or damaged (`open_tuner`). MLflow is the source of truth: a lost
or damaged folder is found again there. KerasTuner is imported only to rebuild.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

from nas import funnel, tracking
from nas.errors import SearchError
from nas.settings import STATE_FILE, SearchConfig
from nas.state import StateError, read_json, write_atomic

__all__ = ["SearchState", "read_state", "saved_state", "find", "search_tags", "go_on",
           "write_state", "close_replaced", "open_tuner", "finished"]


@dataclasses.dataclass(frozen=True)
class SearchState:
    """Where a search is: what `nas_search.json` holds (and the tracking store, found again).

    Attributes:
        search_run_id: The search's run; `experiment_id` its experiment.
        fingerprint: Of the settings it was started with (`SearchConfig.fingerprint`);
            None in a file that lacks it (it resumes nothing).
        max_trials: Its budget of trials so far (it grows); None in a file written before
            budgets grew (the config's applies).
        data_digest: Its data's files (`nas.data.Arrays.data_digest`; "" for data in
            memory); None in a file written before a folder's split was by file.
        data_files: How many files its data had then (`nas.data.Arrays.samples`).
        found_in_store: Found in the tracking store, not in the working folder (never
            written to the file).
    """

    search_run_id: str
    experiment_id: str
    fingerprint: str | None = None
    max_trials: int | None = None
    data_digest: str | None = None
    data_files: int | None = None
    found_in_store: bool = False

    @classmethod
    def from_json(cls, data) -> SearchState:
        """The state a `nas_search.json` holds, as any version of nas wrote it.

        Raises:
            StateError: it is no state of a search (not a mapping, or no run named).
        """
        if not isinstance(data, dict) or not all(
                isinstance(data.get(key), str) for key in ("search_run_id", "experiment_id")):
            raise StateError(f"{STATE_FILE} names no search run")
        return cls(data["search_run_id"], data["experiment_id"], data.get("fingerprint"),
                   data.get("max_trials"), data.get("data_digest"), data.get("data_files"))

    def to_json(self) -> str:
        """The file's text, as every version of nas reads it (what it lacked, left out)."""
        fields = dataclasses.asdict(self)
        del fields["found_in_store"]
        return json.dumps({key: value for key, value in fields.items() if value is not None})


def _state_file(config: SearchConfig) -> Path:
    return config.project_dir / STATE_FILE


def read_state(project_dir: str | os.PathLike) -> SearchState | None:
    """The state a search's project folder holds; None when it holds none it can read."""
    try:
        return SearchState.from_json(read_json(Path(project_dir) / STATE_FILE))
    except (OSError, StateError):  # missing, unreadable, or no search's state
        return None


def saved_state(config: SearchConfig) -> SearchState | None:
    """The state the search's working folder holds, or None: none, or one that cannot be
    read (the search is then found again in the tracking store, or refused there).

    Raises:
        SearchError: the folder holds a search with other settings, and
            `config.overwrite` is not set.
    """
    state = read_state(config.project_dir)
    if state is None:
        return None
    if not config.overwrite and state.fingerprint != config.fingerprint():
        raise SearchError(
            f"`experiment`: {config.experiment_name!r} already holds a search with other "
            f"settings (in {config.project_dir}); pass `overwrite` to start afresh, or "
            f"choose another `experiment`")
    return state


def find(config: SearchConfig, arrays, tracker: tracking.Tracker,
         saved: SearchState | None) -> SearchState | None:
    """The state of the search `config` goes on with (`saved`, else the tracking store's),
    or None for a new search. Reads only.

    Raises:
        SearchError: its working folder or its data cannot go on as they are.
    """
    state = saved or _found_in_store(tracker, config)
    problem = _unresumable(config, state) or _other_data(config, arrays, state)
    if problem:
        raise SearchError(problem)
    return state


def search_tags(config: SearchConfig, arrays) -> dict[str, str]:
    """The tags a new search's run is found again by (`find`, when its folder is lost)."""
    return {tracking.TAG_KIND: "search", tracking.TAG_FINGERPRINT: config.fingerprint(),
            tracking.TAG_DATA_DIGEST: arrays.data_digest}


def _found_in_store(tracker: tracking.Tracker, config: SearchConfig) -> SearchState | None:
    """The state of this search (same experiment and settings) as the tracking store holds
    it, when its working folder lost it; None if the store holds no such search."""
    run = tracker.find_search_run(config.experiment_name, config.fingerprint())
    if run is None:
        return None
    params = run.data.params
    budget = run.data.tags.get(tracking.TAG_MAX_TRIALS) or params.get("max_trials")
    return SearchState(
        run.info.run_id, run.info.experiment_id, config.fingerprint(),
        int(budget) if budget else config.budget.max_trials,
        run.data.tags.get(tracking.TAG_DATA_DIGEST, ""),
        sum(int(params.get(f"{split}_samples", 0)) for split in ("train", "val", "test")),
        found_in_store=True)


def _other_data(config: SearchConfig, arrays, state: SearchState | None) -> str | None:
    """Why the search being resumed cannot go on with these files, or None: a directory's
    split is by file, so other files would give it another split."""
    if state is None or (state.data_digest or "") == arrays.data_digest:
        return None
    if state.data_digest is None:  # written before a folder's split was by file
        return (f"{config.pipeline.source_file}: data.path: this search was started by an "
                f"earlier nas, which split the images in {config.pipeline.path} otherwise; "
                f"pass `overwrite` to start afresh, or choose another `experiment`")
    files = "?" if state.data_files is None else state.data_files
    return (f"{config.pipeline.source_file}: data.path: the images in {config.pipeline.path} "
            f"changed since this search started ({files} files then, "
            f"{arrays.samples} now), so its split would differ; restore them, or pass "
            f"`overwrite` to start afresh, or choose another `experiment`")


def _unresumable(config: SearchConfig, state: SearchState | None) -> str | None:
    """Why the search's working folder cannot be used as it is, or None (read only)."""
    tuner_file = _tuner_file(config)
    if state is None:
        if (config.project_dir / "oracle.json").exists() or tuner_file.exists():
            return _unknown_state(config)
        return None
    if config.tuner == "hyperband" and _damage(config.project_dir, tuner_file) is not None:
        return _no_hyperband_rebuild(config)
    return None


def _unknown_state(config: SearchConfig) -> str:
    return (f"`workdir`: {config.project_dir} holds the KerasTuner state of a search that "
            f"neither it nor the tracking store knows; pass `overwrite` to start afresh")


def _no_hyperband_rebuild(config: SearchConfig) -> str:
    return (f"`workdir`: the hyperband state of {config.experiment_name!r} in "
            f"{config.project_dir} is missing or damaged and cannot be rebuilt (its brackets "
            f"are not in MLflow, its trials are); pass `overwrite` to start afresh")


def _tuner_file(config: SearchConfig) -> Path:
    return config.project_dir / f"{os.environ.get('KERASTUNER_TUNER_ID', 'tuner0')}.json"


def _damage(project_dir: Path, tuner_file: Path) -> str | None:
    """What is wrong with a search's KerasTuner state files, or None if they read back."""
    if not tuner_file.exists():
        return "missing"
    for path in [project_dir / "oracle.json", tuner_file,
                 *sorted(project_dir.glob("trial_*/trial.json"))]:
        try:
            read_json(path)
        except (OSError, StateError) as error:
            return f"damaged ({error})"
    return None


# --- going on ------------------------------------------------------------------------


def go_on(tracker: tracking.Tracker, config: SearchConfig, state: SearchState,
          experiment_id: str, echo: Callable[[str], None]) -> SearchState:
    """Take up the search `state` describes: the trial runs a dead process left RUNNING
    closed, its budget grown to `config`'s when that is larger. Returns its state now."""
    if state.found_in_store:
        echo(f"found this search in the tracking store (run {state.search_run_id}); "
             f"going on from there")
    closed = tracker.close_stale_runs(experiment_id, state.search_run_id)
    if closed:
        echo(f"closed {closed} trial run(s) left running by an earlier process")
    wanted = config.budget.max_trials
    budget = state.max_trials if state.max_trials is not None else wanted
    if wanted > budget:
        echo(f"growing the search from {budget} to {wanted} trials")
        tracker.set_tags(state.search_run_id, {tracking.TAG_MAX_TRIALS: wanted})
    return dataclasses.replace(state, max_trials=max(budget, wanted), found_in_store=False)


def write_state(config: SearchConfig, state: SearchState) -> None:
    """`state` into the search's project folder, atomically."""
    write_atomic(_state_file(config), state.to_json())


def close_replaced(tracker: tracking.Tracker, previous: SearchState,
                   echo: Callable[[str], None]) -> None:
    """Close, as KILLED, what a search replaced by `overwrite` left running."""
    try:
        closed = tracker.close_stale_runs(previous.experiment_id, previous.search_run_id)
        if tracker.get_run(previous.search_run_id).info.status == "RUNNING":
            tracker.end(previous.search_run_id, "KILLED")
            closed += 1
    except Exception:  # the old run may be gone (deleted, or another store)
        return
    if closed:
        echo(f"closed {closed} run(s) of the replaced search as KILLED")


def finished(oracle, max_trials: int) -> bool:
    """Whether every trial of the search was trained (no trial is left to run)."""
    trials = oracle.trials.values()
    return len(trials) >= max_trials and all(t.status in ("COMPLETED", "FAILED")
                                             for t in trials)


# --- KerasTuner's state, reloaded or rebuilt ----------------------------------------------


def open_tuner(config: SearchConfig, tracker: tracking.Tracker, experiment_id: str,
               search_run_id: str, resumed: bool, new_oracle, new_tuner, echo):
    """The search's tuner, its KerasTuner state reloaded, or rebuilt from the tracking store
    when it is missing or damaged (a resumed search only).

    `new_oracle()` makes the search's oracle, `new_tuner(oracle)` its tuner over it (which
    reloads the state it finds); `echo(line)` is told of a rebuild.
    """
    from nas import ktcompat, oracles

    project_dir, tuner_file = config.project_dir, _tuner_file(config)
    # Damage shows as KerasTuner reloads (nas.ktcompat): the files are not read twice.
    damage = "missing" if resumed and not tuner_file.exists() else None
    if damage is None:
        try:
            return new_tuner(new_oracle())
        except (StateError, FileNotFoundError) as error:
            if not resumed:  # a race: `prepare` refuses such a folder
                raise SearchError(_unknown_state(config)) from None
            damage = f"damaged ({error})"
    echo(f"the search's state in {project_dir} is {damage}; rebuilding it from the tracking "
         f"store")
    if config.tuner == "hyperband":  # a damage `prepare` could not see (it reads JSON only)
        raise SearchError(_no_hyperband_rebuild(config))
    for stale in [project_dir / "oracle.json", tuner_file,
                  *project_dir.glob("trial_*/trial.json")]:
        stale.unlink(missing_ok=True)  # the checkpoints stay: the same trials' weights
    oracle = new_oracle()
    trials = _store_trials(tracker, experiment_id, search_run_id, config,
                           oracles.declare(config.space))
    ktcompat.rebuild(oracle, trials, config.workdir, config.project_name)
    ended = sum(t["status"] != "RUNNING" for t in trials)
    echo(f"rebuilt {ended} ended trial{'' if ended == 1 else 's'} from the tracking store"
         + (f"; {len(trials) - ended} interrupted one(s) will run again"
            if len(trials) > ended else ""))
    return new_tuner(oracle)


def _store_trials(tracker: tracking.Tracker, experiment_id: str, search_run_id: str,
                  config: SearchConfig, hyperparameters) -> list[dict]:
    """The search's trials as its trial runs hold them, for `nas.ktcompat.rebuild`."""
    objective, direction = config.pipeline.objective, config.pipeline.direction
    found: dict[str, dict] = {}
    for run in tracker.trial_runs(experiment_id, search_run_id):  # oldest first
        trial_id = run.data.tags.get(tracking.TAG_TRIAL)
        if trial_id is None or found.get(trial_id, {}).get("status") == "COMPLETED":
            continue  # a trial that finished once is that trial
        status = {"FINISHED": "COMPLETED", "FAILED": "FAILED"}.get(run.info.status, "RUNNING")
        score, best_step = run.data.metrics.get("objective"), 0
        if status == "COMPLETED" and score is not None:
            history = tracker.metric_history(run.info.run_id, objective)
            if history:
                best = (max if direction == "max" else min)(history, key=lambda m: m.value)
                best_step = int(best.step)
        found[trial_id] = {"trial_id": trial_id, "status": status, "score": score,
                           "best_step": best_step,
                           "values": _values(hyperparameters, run.data.params)}
    return list(found.values())


def _values(hyperparameters, params: dict) -> dict:
    """A trial's hyperparameter values from its run's params (MLflow keeps strings), and
    its fidelity in a funnel (`nas.funnel`)."""
    import keras_tuner as kt

    values = {}
    for hp in hyperparameters.space:
        text = params.get(hp.name)
        if text is None:
            continue
        if isinstance(hp, kt.engine.hyperparameters.Boolean):
            values[hp.name] = text in ("true", "True")
        elif isinstance(hp, kt.engine.hyperparameters.Int):
            values[hp.name] = int(float(text))
        elif isinstance(hp, kt.engine.hyperparameters.Float):
            values[hp.name] = float(text)
        else:
            choices = hp.values if hasattr(hp, "values") else [hp.value]
            values[hp.name] = next((v for v in choices if text in (str(v), json.dumps(v))),
                                   text)
    return {**values, **funnel.from_params(params)}  # a funnel's look or full training
