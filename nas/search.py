"""One search end to end: check the input, then data -> tuner -> MLflow -> best trials.

`prepare` does everything that can refuse bad input (specs are already loaded; data,
tracking store, resume state) and writes nothing; `run` trains and logs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
from pathlib import Path

from nas import assembly, final_model, pareto, results, tracking
from nas.data import Arrays, load_arrays
from nas.errors import SearchError, SearchFailed
from nas.events import CandidateRejected, Callback, SearchEnded
from nas.settings import (STATE_FILE, TAG_DATA_DIGEST, TAG_FINGERPRINT, TAG_MAX_TRIALS,
                          SearchConfig)
from nas.space import search_problem
from nas.state import SearchLock, StateError, read_json, write_atomic

__all__ = ["Prepared", "SearchConfig", "SearchError", "SearchFailed", "SearchResult",
           "prepare", "run"]


@dataclasses.dataclass
class SearchResult:
    experiment_id: str
    search_run_id: str
    objective: str
    direction: str
    trials: list[results.TrialRow]  # as MLflow holds them (see nas.results)
    rejected: int
    resumed: bool
    # The final model's scores on the held-out test data (test_accuracy, test_loss,
    # test_samples), measured once after the search; empty without test data.
    test: dict = dataclasses.field(default_factory=dict)
    stopped_by_time: bool = False  # --time-limit ended it before --max-trials
    final_trials: list[str] = dataclasses.field(default_factory=list)  # the final model's
    refit: bool = False  # the final model was retrained on training + validation data

    @property
    def finished(self) -> list[results.TrialRow]:
        ranked = [t for t in self.trials if t.status == "FINISHED" and t.objective is not None]
        return sorted(ranked, key=lambda t: t.objective, reverse=self.direction == "max")

    @property
    def best(self) -> results.TrialRow | None:
        return self.finished[0] if self.finished else None


@dataclasses.dataclass
class Prepared:
    config: SearchConfig
    arrays: Arrays
    tracker: tracking.Tracker
    state: dict | None  # the saved state of the search being resumed
    previous: dict | None = None  # the state of a search that --overwrite replaces
    lock: SearchLock | None = None  # taken by `run`; `prepare` only checks it is free


def prepare(config: SearchConfig) -> Prepared:
    """Check everything the user gave us; raise before anything is written.

    Raises:
        SearchError, nas.errors.DataError, nas.tracking.TrackingError.
    """
    if config.max_trials < 1:
        raise SearchError(f"`max_trials`: {config.max_trials} must be at least 1")
    if config.epochs is not None and config.epochs < 1:
        raise SearchError(f"`epochs`: {config.epochs} must be at least 1")
    if config.batch_size is not None and config.batch_size < 1:
        raise SearchError(f"`batch_size`: {config.batch_size} must be at least 1")
    if config.max_failures < 1:
        raise SearchError(f"`max_failures`: {config.max_failures} must be at least 1")
    if config.ensemble < 1:
        raise SearchError(f"`ensemble`: {config.ensemble} must be at least 1")
    if config.time_limit is not None and config.time_limit <= 0:
        raise SearchError(f"`time_limit`: {config.time_limit:g} s must be above 0")
    for flag, budget in (("`max_params`", config.max_params), ("`max_flops`", config.max_flops)):
        if budget is not None and budget < 1:
            raise SearchError(f"{flag}: {budget} must be at least 1")
    arrays = load_arrays(config.pipeline, config.skip_bad_images)
    # Before the tracking store is touched: a space nothing in can be trained is refused.
    problem = search_problem(config, arrays.input_shape, arrays.num_classes)
    if problem:
        raise SearchError(problem)
    _check_workdir(config.project_dir)
    lock = SearchLock(config.project_dir, config.experiment_name)
    lock.check()  # another process runs this search: refused before anything is written
    state = None
    state_file = config.project_dir / STATE_FILE
    if state_file.exists():
        try:
            state = read_json(state_file)
        except (OSError, StateError):
            state = {}  # found again in the tracking store (`run`), or refused there
        if (state and not config.overwrite
                and state.get("fingerprint") != config.fingerprint()):
            raise SearchError(_other_settings(config))
    tracker = tracking.Tracker(config.tracking_uri)
    tracker.check()
    if config.overwrite:
        return Prepared(config, arrays, tracker, None, previous=state or None, lock=lock)
    state = state or _found_in_store(tracker, config)
    problem = _unresumable(config, state) or _other_data(config, arrays, state)
    if problem:
        raise SearchError(problem)
    return Prepared(config, arrays, tracker, state, lock=lock)


def _other_settings(config: SearchConfig) -> str:
    return (f"`experiment`: {config.experiment_name!r} already holds a search with other "
            f"settings (in {config.project_dir}); pass `overwrite` to start afresh, or "
            f"choose another `experiment`")


def _other_data(config: SearchConfig, arrays: Arrays, state: dict | None) -> str | None:
    """Why the search being resumed cannot go on with these files, or None: a directory's
    split is by file, so other files would give it another split."""
    if not state or state.get("data_digest", "") == arrays.data_digest:
        return None
    if "data_digest" not in state:  # written before a folder's split was by file
        return (f"{config.pipeline.source_file}: data.path: this search was started by an "
                f"earlier nas, which split the images in {config.pipeline.path} otherwise; "
                f"pass `overwrite` to start afresh, or choose another `experiment`")
    return (f"{config.pipeline.source_file}: data.path: the images in {config.pipeline.path} "
            f"changed since this search started ({state.get('data_files', '?')} files then, "
            f"{arrays.samples} now), so its split would differ; restore them, or pass "
            f"`overwrite` to start afresh, or choose another `experiment`")


def _check_workdir(folder: Path) -> None:
    """Refuse a working folder that cannot be created or written, without creating it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SearchError(f"`workdir`: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SearchError(f"`workdir`: {existing} is not writable")


def run(prepared: Prepared, callback: Callback | None = None, serve=None) -> SearchResult:
    """Train the search's trials, logging each to MLflow; return what was found.

    `callback` (a `nas.events.Callback`, such as a `Printer`; without one, nobody) receives
    what happens: notices, trials starting and ending, epochs, rejected candidates, the
    search's end.
    `serve(tuner, experiment_id, search_run_id)`, if given, runs the search in place of
    training here: the chief of a distributed search serves the oracle to its workers
    (`nas.distributed.run_chief`).

    The search holds its lock (`nas.state.SearchLock`) from before it writes anything
    until it returns or raises.

    Raises:
        nas.state.StateError: another process holds the search's lock.
        nas.errors.Interrupted / KeyboardInterrupt: stopped by a signal; the state is
            saved and running the same command resumes.
        SearchFailed: too many consecutive trials failed; finished trials are kept.
    """
    config = prepared.config
    callback = callback if callback is not None else Callback()
    lock = prepared.lock or SearchLock(config.project_dir, config.experiment_name)
    lock.acquire()
    try:
        result = _run(prepared, callback, serve)
    finally:
        lock.release()
    callback.on_search_end(SearchEnded(result))
    return result


def _run(prepared: Prepared, callback: Callback, serve) -> SearchResult:
    from nas.data import make_datasets, refit_dataset, test_dataset

    config, tracker, arrays = prepared.config, prepared.tracker, prepared.arrays
    echo = callback.on_message
    pipeline = config.pipeline
    assembly.configure_tensorflow(config)
    final_model.prepare_model_logging()  # no-op when `nas search` already started it
    assembly.import_ahead()
    # The search's inputs are ready before its run starts: the data was read by `prepare`,
    # and here becomes the tf.data pipelines every trial shares.
    datasets = make_datasets(arrays, config.batch_size or pipeline.batch_size, config.seed)
    project_dir = config.project_dir
    if config.overwrite and any((project_dir / f).exists() for f in (STATE_FILE, "oracle.json")):
        shutil.rmtree(project_dir)  # only ever a search's own state folder
    project_dir.mkdir(parents=True, exist_ok=True)

    experiment_id = tracker.experiment_id(config.experiment_name)
    if prepared.previous:
        _close_search(tracker, prepared.previous, echo)
    state = prepared.state
    resumed = state is not None
    if resumed and state.pop("found_in_store", False):
        echo(f"found this search in the tracking store (run {state['search_run_id']}); "
             f"going on from there")
    if resumed:
        search_run_id = state["search_run_id"]
        closed = tracker.close_stale_runs(experiment_id, search_run_id)
        if closed:
            echo(f"closed {closed} trial run(s) left running by an earlier process")
        budget = state.get("max_trials", config.max_trials)
        if config.max_trials > budget:
            echo(f"growing the search from {budget} to {config.max_trials} trials")
            tracker.set_tags(search_run_id, {TAG_MAX_TRIALS: config.max_trials})
        state = {**state, "max_trials": max(budget, config.max_trials)}
    else:
        search_run_id = tracker.start_run(
            experiment_id, f"search-{config.experiment_name}",
            tags={tracking.TAG_KIND: "search", TAG_FINGERPRINT: config.fingerprint(),
                  TAG_DATA_DIGEST: arrays.data_digest})
        _log_search(tracker, search_run_id, config, arrays)
        state = {"search_run_id": search_run_id, "experiment_id": experiment_id,
                 "fingerprint": config.fingerprint(), "max_trials": config.max_trials,
                 "data_digest": arrays.data_digest, "data_files": arrays.samples}
    write_atomic(project_dir / STATE_FILE, json.dumps(state))

    parts = assembly.assemble(config, arrays, tracker, experiment_id, search_run_id, callback)
    hooks = parts.hooks

    def new_oracle():
        return parts.oracle(on_reject=lambda why: callback.on_candidate_rejected(
            CandidateRejected(why.kind, why.reason, why.stage)))

    # The handlers go back before the run is closed, as it was opened: a signal then
    # cannot turn a finished search into an interrupted one.
    with tracker.run(experiment_id, "", run_id=search_run_id, reopen=resumed), \
            assembly.interruptions():
        try:
            tuner = _open_tuner(config, tracker, experiment_id, search_run_id, resumed,
                                new_oracle, parts.tuner, echo)
            hooks.resume_from(tuner.oracle)
            if resumed and _finished(tuner.oracle, config.max_trials):
                echo("the search had already finished; its results as logged (`overwrite` "
                     "starts afresh)")
                return _result(tuner, tracker, experiment_id, search_run_id, config, resumed)
            # Garbage is collected once a trial (see NasTuner._try_build); with TensorFlow
            # and MLflow loaded a full collection takes ~0.5 s. Freezing what exists now
            # (modules, the data) leaves only the trials' own objects to scan.
            gc.freeze()
            try:
                if serve is not None:  # workers train the trials; this process serves
                    _search(tuner, lambda: serve(tuner, experiment_id, search_run_id))
                else:
                    _search(tuner, lambda: parts.search(tuner, datasets))
            finally:
                hooks.close()
            result = _result(tuner, tracker, experiment_id, search_run_id, config, resumed)
            _log_outcome(tracker, search_run_id, result)
            # One after the other: both are Python-bound, and in two threads they take
            # longer than in turn.
            pareto.log_plot(tracker, search_run_id, result.finished, result.objective,
                            result.direction, title=f"search {config.experiment_name}")
            # The only place the test data is read: the final model, scored once.
            batch_size = config.batch_size or pipeline.batch_size
            test = test_dataset(arrays, batch_size)
            result.test, result.final_trials = final_model.log_best_model(
                tracker, search_run_id, tuner, result, register=config.register, echo=echo,
                test=None if test is None else (test, len(arrays.y_test)),
                ensemble=config.ensemble, seed=config.seed,
                refit=refit_dataset(arrays, batch_size, config.seed) if config.refit else None)
            result.refit = config.refit and bool(result.final_trials)
        finally:
            hooks.close()
            gc.unfreeze()
    return result


def _open_tuner(config: SearchConfig, tracker, experiment_id: str, search_run_id: str,
                resumed: bool, new_oracle, new_tuner, echo):
    """The search's tuner, its KerasTuner state reloaded, or rebuilt from the tracking store
    when it is missing or damaged (a resumed search only)."""
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
    echo(f"rebuilt {_count(ended, 'ended trial')} from the tracking store"
         + (f"; {len(trials) - ended} interrupted one(s) will run again"
            if len(trials) > ended else ""))
    return new_tuner(oracle)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


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


def _unresumable(config: SearchConfig, state: dict | None) -> str | None:
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


def _found_in_store(tracker, config: SearchConfig) -> dict | None:
    """The state of this search (same experiment and settings) as the tracking store holds
    it, when its working folder lost it; None if the store holds no such search. Reads
    only."""
    run = tracker.find_search_run(config.experiment_name, config.fingerprint())
    if run is None:
        return None
    params = run.data.params
    budget = run.data.tags.get(TAG_MAX_TRIALS) or params.get("max_trials")
    return {"search_run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "fingerprint": config.fingerprint(), "found_in_store": True,
            "max_trials": int(budget) if budget else config.max_trials,
            "data_digest": run.data.tags.get(TAG_DATA_DIGEST, ""),
            "data_files": sum(int(params.get(f"{split}_samples", 0))
                              for split in ("train", "val", "test"))}


def _store_trials(tracker, experiment_id: str, search_run_id: str, config: SearchConfig,
                  hyperparameters) -> list[dict]:
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
    """A trial's hyperparameter values from its run's params (MLflow keeps strings)."""
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
    return values


def _finished(oracle, max_trials: int) -> bool:
    """Whether every trial of the search was trained (no trial is left to run)."""
    trials = oracle.trials.values()
    return len(trials) >= max_trials and all(t.status in ("COMPLETED", "FAILED")
                                             for t in trials)


def _search(tuner, search) -> None:
    """`search()` (the tuner's search), with KerasTuner's too-many-failures error made
    readable."""
    from nas import ktcompat

    try:
        search()
    except RuntimeError as error:
        if not ktcompat.too_many_failures(error):
            raise
        failed = [t for t in tuner.oracle.trials.values() if t.status in ("FAILED", "INVALID")]
        lines = [f"trial {t.trial_id}: {_last_line(t.message)}" for t in failed]
        raise SearchFailed(
            f"{tuner.oracle.max_consecutive_failed_trials} trials in a row failed "
            f"(`max_failures`); finished trials are kept", lines) from None


def _last_line(message: str | None) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


def _close_search(tracker, state: dict, echo) -> None:
    """Close, as KILLED, what a search replaced by --overwrite left running."""
    run_id, experiment_id = state.get("search_run_id"), state.get("experiment_id")
    try:
        closed = tracker.close_stale_runs(experiment_id, run_id)
        if tracker.get_run(run_id).info.status == "RUNNING":
            tracker.end(run_id, "KILLED")
            closed += 1
    except Exception:  # the old run may be gone (deleted, or another store)
        return
    if closed:
        echo(f"closed {closed} run(s) of the replaced search as KILLED")


def _log_search(tracker, run_id: str, config: SearchConfig, arrays: Arrays) -> None:
    tracker.log_params(run_id, {
        **config.params(),
        "input_shape": list(arrays.input_shape), "num_classes": arrays.num_classes,
        "train_samples": len(arrays.x_train), "val_samples": len(arrays.x_val),
        "test_samples": len(arrays.x_test), "test_data": arrays.test_source,
    })
    tracker.log_text(run_id, config.space.text, f"specs/{config.space.name}.yaml")
    tracker.log_text(run_id, config.pipeline.text, f"specs/{config.pipeline.name}.yaml")
    tracker.log_dict(run_id, {"class_names": list(arrays.class_names),
                              "pixel_scale": arrays.pixel_scale}, "classes.json")
    skipped = arrays.files.skipped if arrays.files else ()
    if skipped:  # --skip-bad-images: which files the search left out
        tracker.log_params(run_id, {"skipped_images": len(skipped)})
        tracker.log_text(run_id, "\n".join(skipped) + "\n", "skipped_images.txt")


def _result(tuner, tracker, experiment_id, search_run_id, config, resumed) -> SearchResult:
    """The search's trials read back from MLflow, exactly as `nas trials` shows them."""
    search, _ = results.find_run(tracker, search_run_id)
    pipeline = config.pipeline
    return SearchResult(experiment_id, search_run_id, pipeline.objective, pipeline.direction,
                        results.list_trials(tracker, search), tuner.oracle.rejected, resumed,
                        test=search.test,
                        final_trials=search.final_trials,
                        stopped_by_time=getattr(tuner.oracle, "stopped_by_time", False),
                        refit=search.refit)


def _log_outcome(tracker, run_id: str, result: SearchResult) -> None:
    metrics = {
        "rejected_candidates": result.rejected,
        "finished_trials": len(result.finished),
        "failed_trials": sum(t.status == "FAILED" for t in result.trials),
    }
    tags = {}
    best = result.best
    if best is not None:
        metrics.update({"best_objective": best.objective, f"best_{result.objective}":
                        best.objective, "best_params": best.params, "best_flops": best.flops})
        tags = {tracking.TAG_BEST_TRIAL: best.trial_id, tracking.TAG_BEST_RUN: best.run_id or ""}
    tracker.log_batch(run_id, tracker.metrics(metrics), tags=tags)
