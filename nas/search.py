"""One search end to end: check the input, then data -> tuner -> MLflow -> best trials.

`prepare` does everything that can refuse bad input (specs are already loaded; data,
tracking store, the state of a search it resumes: `nas.resume`) and writes nothing; `run`
trains and logs.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
from pathlib import Path
from typing import Callable

from nas import assembly, final_model, pareto, results, resume, tracking
from nas.data import Arrays, load_arrays
from nas.errors import SearchError, SearchFailed
from nas.events import CandidateRejected, Callback, SearchEnded
from nas.latency_table import LatencyTable, space_layers
from nas.settings import STATE_FILE, SearchConfig
from nas.space import search_problem
from nas.state import SearchLock

__all__ = ["LATENCY_TABLE_ARTIFACT", "Prepared", "SearchConfig", "SearchError",
           "SearchFailed", "SearchResult", "latency_table", "prepare", "run"]

LATENCY_TABLE_ARTIFACT = "latency_table.json"  # on the search's run, with `max_latency_ms`


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
    flips: bool = False  # the final model also sees each image's mirror image

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
    state: resume.SearchState | None  # the search being resumed (None: a new search)
    previous: resume.SearchState | None = None  # the search `overwrite` replaces
    # Taken by `run` (or before it, by its caller: `nas search`); `prepare` only checks
    # it is free.
    lock: SearchLock | None = None
    # What the guard predicts a candidate's latency from (with `max_latency_ms`).
    latency_table: LatencyTable | None = None


def prepare(config: SearchConfig, checks: Callable[[], None] | None = None) -> Prepared:
    """Check everything the user gave us; raise before anything is written. `checks`, if
    given, are the caller's own (`nas.scaleout`'s), run before the tracking store is
    opened.

    Raises:
        SearchError, nas.errors.DataError, nas.tracking.TrackingError.
    """
    budget = config.budget
    if budget.max_trials < 1:
        raise SearchError(f"`max_trials`: {budget.max_trials} must be at least 1")
    if config.epochs is not None and config.epochs < 1:
        raise SearchError(f"`epochs`: {config.epochs} must be at least 1")
    if config.batch_size is not None and config.batch_size < 1:
        raise SearchError(f"`batch_size`: {config.batch_size} must be at least 1")
    if budget.max_failures < 1:
        raise SearchError(f"`max_failures`: {budget.max_failures} must be at least 1")
    if config.final.ensemble < 1:
        raise SearchError(f"`ensemble`: {config.final.ensemble} must be at least 1")
    if budget.time_limit is not None and budget.time_limit <= 0:
        raise SearchError(f"`time_limit`: {budget.time_limit:g} s must be above 0")
    for flag, limit in (("`max_params`", config.max_params), ("`max_flops`", config.max_flops)):
        if limit is not None and limit < 1:
            raise SearchError(f"{flag}: {limit} must be at least 1")
    if config.latency_table is not None and config.max_latency_ms is None:
        raise SearchError("`latency_table` is for `max_latency_ms`: give it too")
    arrays = load_arrays(config.pipeline, config.skip_bad_images)
    # Before the tracking store is touched: a space nothing in can be trained is refused.
    problem = search_problem(config, arrays.input_shape, arrays.num_classes)
    if problem:
        raise SearchError(problem)
    table = None if config.max_latency_ms is None else latency_table(config, arrays)
    _check_workdir(config.project_dir)
    lock = SearchLock(config.project_dir, config.experiment_name)
    lock.check()  # another process runs this search: refused before anything is written
    saved = resume.saved_state(config)
    if checks is not None:
        checks()
    tracker = tracking.Tracker(config.tracking_uri)
    tracker.check()
    if config.overwrite:
        return Prepared(config, arrays, tracker, None, previous=saved, lock=lock,
                        latency_table=table)
    return Prepared(config, arrays, tracker, resume.find(config, arrays, tracker, saved),
                    lock=lock, latency_table=table)


def latency_table(config: SearchConfig, arrays) -> LatencyTable:
    """The per-layer table the guard of `max_latency_ms` predicts from: the file
    `latency_table`, which must hold every layer a candidate of the space can have (it
    cannot grow), or this machine's for the search's engine and threads, which grows.

    Raises:
        nas.latency_table.LatencyTableError: the file is missing, malformed or lacks a
            layer; names the file (and the layer).
    """
    if config.latency_table is None:
        return LatencyTable.cached(config.latency_engine, config.latency_threads)
    table = LatencyTable.load(config.latency_table)
    needed = space_layers(config.space, arrays.input_shape, arrays.num_classes,
                          arrays.pixel_scale)
    lacking = [entry for key, entry in needed.items() if key not in table.entries]
    if lacking:
        raise table.lacks(lacking)
    return table


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
    `serve(tuner, experiment_id, search_run_id)`, if given, trains the oracle's trials in
    place of this process: a search on Ray hands each to a Ray task (`nas.scaleout.drive`),
    while this process keeps the oracle, the state and the parent run.

    The search holds its lock (`nas.state.SearchLock`) from before it writes anything
    until it returns or raises (taken here, unless the caller took `prepared.lock` already;
    released here either way).

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
    if prepared.previous is not None:
        resume.close_replaced(tracker, prepared.previous, echo)
    state = prepared.state
    resumed = state is not None
    if resumed:
        state = resume.go_on(tracker, config, state, experiment_id, echo)
    else:
        state = resume.SearchState(
            tracker.start_run(experiment_id, f"search-{config.experiment_name}",
                              tags=resume.search_tags(config, arrays)),
            experiment_id, config.fingerprint(), config.budget.max_trials, arrays.data_digest,
            arrays.samples)
        _log_search(tracker, state.search_run_id, config, arrays)
    resume.write_state(config, state)
    search_run_id = state.search_run_id

    parts = assembly.assemble(config, arrays, tracker, experiment_id, search_run_id, callback,
                              prepared.latency_table)
    hooks = parts.hooks
    if parts.latency is not None:
        echo(_predicting(parts.latency.table))

    def new_oracle():
        return parts.oracle(on_reject=lambda why: callback.on_candidate_rejected(
            CandidateRejected(why.kind, why.reason, why.stage)))

    # The handlers go back before the run is closed, as it was opened: a signal then
    # cannot turn a finished search into an interrupted one.
    with tracker.run(experiment_id, "", run_id=search_run_id, reopen=resumed), \
            assembly.interruptions():
        try:
            tuner = resume.open_tuner(config, tracker, experiment_id, search_run_id, resumed,
                                      new_oracle, parts.tuner, echo)
            hooks.resume_from(tuner.oracle)
            if resumed and resume.finished(tuner.oracle, config.budget.max_trials):
                echo("the search had already finished; its results as logged (`overwrite` "
                     "starts afresh)")
                return _result(tuner, tracker, experiment_id, search_run_id, config, resumed)
            # Garbage is collected once a trial (see NasTuner._try_build); with TensorFlow
            # and MLflow loaded a full collection takes ~0.5 s. Freezing what exists now
            # (modules, the data) leaves only the trials' own objects to scan.
            gc.freeze()
            try:
                if serve is not None:  # Ray tasks train the trials; this process drives
                    _search(tuner, lambda: serve(tuner, experiment_id, search_run_id))
                else:
                    _search(tuner, lambda: parts.search(tuner, datasets))
            finally:
                hooks.close()
                if parts.latency is not None:  # the table the guard predicted from
                    tracker.log_dict(search_run_id, parts.latency.table.to_dict(),
                                     LATENCY_TABLE_ARTIFACT)
            result = _result(tuner, tracker, experiment_id, search_run_id, config, resumed)
            _log_outcome(tracker, search_run_id, result)
            # One after the other: both are Python-bound, and in two threads they take
            # longer than in turn.
            pareto.log_plot(tracker, search_run_id, result.finished, result.objective,
                            result.direction, title=f"search {config.experiment_name}")
            # The only place the test data is read: the final model, scored once.
            batch_size = config.batch_size or pipeline.batch_size
            test = test_dataset(arrays, batch_size)
            final = config.final
            result.test, result.final_trials, result.flips = final_model.log_best_model(
                tracker, search_run_id, tuner, result, register=final.register, echo=echo,
                test=None if test is None else (test, len(arrays.y_test)),
                ensemble=final.ensemble, seed=config.seed,
                refit=refit_dataset(arrays, batch_size, config.seed) if final.refit else None,
                latency=assembly.latency_meter(config), max_latency_ms=config.max_latency_ms,
                flips=pipeline.test_time_flips)
            result.refit = final.refit and bool(result.final_trials)
        finally:
            hooks.close()
            gc.unfreeze()
    return result


def _predicting(table: LatencyTable) -> str:
    """The notice of a search whose guard predicts latencies from `table`."""
    held = f"{len(table.entries):,} layers"
    if table.fixed:
        return (f"latency budget: candidates predicted over `max_latency_ms` are not trained "
                f"(per-layer table {table.path}, {held}, measured on {table.machine})")
    return (f"latency budget: candidates predicted over `max_latency_ms` are not trained "
            f"(this machine's per-layer table {table.path}, {held}; a layer met for the "
            f"first time is measured first)")


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
                        refit=search.refit, flips=search.flips)


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
