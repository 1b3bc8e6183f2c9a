"""One nested MLflow run per trial, written while the trial trains; the trial's events.

`TrialRuns` is the tuner's hooks (`nas.tuning.NasTuner` calls them): it opens a trial's
run, logs its choices, per-epoch metrics and layer table, keeps the weights the final
model may need, closes the run, and tells the search's `nas.events.Callback` what
happened. Used alike by a one-process search and by the Ray tasks of a search on Ray.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

from nas import funnel, tracking
from nas.events import EpochEnded, TrialEnded, TrialStarted
from nas.settings import SearchConfig

__all__ = ["TrialRuns", "device_name"]

FLUSH_SECONDS = 10.0  # longest a trial's epoch metrics wait before they reach MLflow


def device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name


_CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")  # a trial's per-epoch metrics


class TrialRuns:
    """Tuner hooks: one nested MLflow run per trial, per-epoch metrics, the trial's events.

    A trial's run is written by one background thread, in order, while the main thread
    trains: it is queued once the first batch has trained (by then the model is built and
    its training step traced, and the main thread waits on TensorFlow's kernels, not on
    Python), or when the trial ends if it never trained. `trial_ended` waits for those
    writes and closes the run before KerasTuner records the trial as ended, so a finished
    trial is never left RUNNING in MLflow. `close()` waits for everything queued and closes,
    as KILLED, a run an interruption left open.
    """

    def __init__(self, tracker: tracking.Tracker, experiment_id: str, search_run_id: str,
                 config: SearchConfig, callback, total: int):
        self.tracker = tracker
        self.experiment_id = experiment_id
        self.search_run_id = search_run_id
        self.objective = config.pipeline.objective
        self.direction = config.pipeline.direction
        self.callback = callback  # a `nas.events.Callback`
        self.total = total
        self.epochs = config.epochs_per_trial
        self.time_limit = config.budget.time_limit
        self.runs: dict[str, str] = {}
        self.best: float | None = None
        # Every trial that enters the best `keep` so far has its weights logged to MLflow
        # (what the final model needs, whatever happens to this machine's disk).
        self.keep = max(1, config.final.ensemble)
        self.max_latency_ms = config.max_latency_ms  # trials measured slower: never chosen
        self.project_dir = config.project_dir
        self.scores: list[float] = []  # of the finished trials, this process's and earlier
        self.earlier = 0  # trials ended by earlier processes of a resumed search
        self.ended = 0  # trials ended by this process
        self.device = device_name()
        # The Ray worker process this runs in (`nas.scaleout` sets KerasTuner's tuner id
        # there); None in a search's own process.
        self.worker = os.environ.get("KERASTUNER_TUNER_ID")
        self.tags: dict[str, str] = {}  # on every trial run besides its own (a Ray node's)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "nas-mlflow")
        self._unclosed: set[str] = set()  # runs opened and not yet closed (writer thread)
        self._closed = False
        self._trial = None  # the current trial, its architecture and start (ms since epoch)
        self._opened: concurrent.futures.Future | None = None  # its run id, once queued
        self._flushes: list[concurrent.futures.Future] = []  # its metrics written so far
        self._pending: list = []
        self._started = self._flushed = time.perf_counter()
        self._epoch_ends: list[float] = []  # when the current trial's epochs ended
        self._trial_best: float | None = None
        self._trial_seconds: list[float] = []  # of the trials this process ended
        # The search's time spent (the time limit's clock): the oracle's, which counts
        # earlier processes of a resumed search, once `resume_from` has it.
        search_started = time.perf_counter()
        self._spent = lambda: time.perf_counter() - search_started

    def close(self) -> None:
        """Wait for every write queued; the search's run must not end before them."""
        if not self._closed:
            self._closed = True
            self._writer.submit(self._close_unclosed)
            self._writer.shutdown(wait=True)

    def resume_from(self, oracle) -> None:
        """Count and rank what an earlier process of this search already finished."""
        ended = [t for t in oracle.trials.values() if t.status in ("COMPLETED", "FAILED")]
        self.earlier = len(ended)
        if callable(getattr(oracle, "elapsed", None)):
            self._spent = oracle.elapsed
        scores = [t.score for t in ended if t.status == "COMPLETED" and t.score == t.score
                  and t.score is not None]
        self.scores = list(scores)
        if scores:
            self.best = max(scores) if self.direction == "max" else min(scores)

    def trial_started(self, trial, architecture, resumed: dict | None = None) -> None:
        """`resumed`: the state an earlier process left of this trial (`tuning.Resume`);
        the trial goes on after its last finished epoch, in its run reopened (unless
        another Ray worker, since lost, trained it there: that run was closed KILLED, and a
        new one holds the trial's curves from its first epoch)."""
        earlier = (resumed or {}).get("run_id")
        self._opened, self._flushes, self._pending = None, [], []
        self._logged_until = -1  # epochs the reopened run holds already
        self._started = self._flushed = time.perf_counter()
        self._epoch_ends, self._trial_best = [], None
        if earlier is not None:
            try:  # read before training goes on, so no epoch is logged twice
                run = self.tracker.get_run(earlier)
                if run.data.tags.get(tracking.TAG_WORKER) != (self.worker or "local"):
                    earlier = None
                else:
                    history = self.tracker.metric_history(earlier, self.objective)
                    self._logged_until = max((m.step for m in history), default=-1)
            except Exception:  # the run is gone: a new one is opened
                earlier = None
        self._trial = (trial, architecture, int(time.time() * 1000), earlier)
        if resumed is not None:
            # Epochs the dead process trained but had not yet written to MLflow.
            for epoch in range(self._logged_until + 1, resumed["epoch"] + 1):
                self._pending += self.tracker.metrics(
                    {k: v[epoch] for k, v in resumed["history"].items()
                     if k in _CURVES and epoch < len(v)}, step=epoch)
            self._logged_until = max(self._logged_until, resumed["epoch"])
        elif self.worker is not None:
            self._say_if_restarted(trial.trial_id)
        self.callback.on_trial_begin(TrialStarted(
            trial.trial_id, self.earlier + self.ended + 1, self.total,
            None if resumed is None else resumed["epoch"] + 2))

    def _say_if_restarted(self, trial_id: str) -> None:
        """On a Ray worker: say so when another Ray worker trained this trial before (it
        was lost, and Ray ran the trial again) and its last epoch is not in the working
        folder this one sees, so it starts over."""
        try:
            earlier = self.tracker.trial_runs(self.experiment_id, self.search_run_id,
                                              trial_id)
        except Exception:  # only a notice: the trial trains anyway
            return
        workers = {r.data.tags.get(tracking.TAG_WORKER) for r in earlier}
        others = sorted(workers - {self.worker, None})
        if others:
            self.callback.on_message(
                f"trial {trial_id} starts again at epoch 1: Ray worker {', '.join(others)} "
                f"trained it before and was lost, and its last epoch is not in the working "
                f"folder this node sees (a `workdir` the nodes share continues it)")

    def current_run_id(self) -> str | None:
        """The current trial's run, once it is written (None before)."""
        opened = self._opened
        if opened is None or not opened.done() or opened.exception() is not None:
            return None
        return opened.result()

    def batch_ended(self) -> None:
        if self._opened is None:
            self._opened = self._writer.submit(self._open_run, *self._trial)

    def _open_run(self, trial, architecture, start_time: int, earlier: str | None) -> str:
        tracker = self.tracker
        if earlier is not None and self._reopen(earlier, trial.trial_id):
            return earlier
        run_id = tracker.start_run(
            self.experiment_id, f"trial-{trial.trial_id}",
            tags={tracking.TAG_KIND: "trial", tracking.TAG_TRIAL: trial.trial_id,
                  tracking.TAG_SEARCH: self.search_run_id, tracking.TAG_DEVICE: self.device,
                  tracking.TAG_WORKER: self.worker or "local", **self.tags},
            parent_run_id=self.search_run_id, start_time=start_time,
        )
        try:
            tracker.log_batch(run_id, params=trial.hyperparameters.values,
                              metrics=tracker.metrics({"params": architecture.params,
                                                       "flops": architecture.flops}))
            tracker.log_text(run_id, architecture.table() + "\n", "architecture.txt")
            tracker.log_dict(run_id, architecture.to_dict(), "architecture.json")
        except BaseException:
            tracker.end(run_id, "FAILED")  # a trial's run is always closed
            raise
        self._unclosed.add(run_id)
        return run_id

    def _reopen(self, run_id: str, trial_id: str) -> bool:
        """Reopen the run an earlier process trained this trial in; False if it is gone."""
        try:
            run = self.tracker.get_run(run_id)
        except Exception:
            return False
        if (run.data.tags.get(tracking.TAG_TRIAL) != trial_id
                or run.data.tags.get(tracking.TAG_SEARCH) != self.search_run_id):
            return False
        self.tracker.reopen_run(run_id)
        if tracking.TAG_ERROR in run.data.tags:  # "the process running it died": it lives again
            self.tracker.delete_tag(run_id, tracking.TAG_ERROR)
        self._unclosed.add(run_id)
        return True

    def epoch_ended(self, trial, epoch: int, logs: dict) -> None:
        self.batch_ended()
        # A run that could not be written, or metrics that could not, stop the trial now.
        for future in [self._opened, *self._flushes]:
            if future.done() and future.exception() is not None:
                raise future.exception()
        # Batched: one store write per trial, plus one every FLUSH_SECONDS so a long
        # trial still shows its curves while it trains.
        if epoch > self._logged_until:  # each epoch's metrics once, a resumed trial's too
            self._pending += self.tracker.metrics(
                {k: float(v) for k, v in logs.items() if k in _CURVES}, step=epoch)
        if time.perf_counter() - self._flushed > FLUSH_SECONDS:
            self._flushes.append(self._writer.submit(self._flush, self._opened, self._pending))
            self._pending, self._flushed = [], time.perf_counter()
        self.callback.on_epoch_end(self._epoch_event(trial, epoch, logs))

    def _epoch_event(self, trial, epoch: int, logs: dict) -> EpochEnded:
        now = time.perf_counter()
        self._epoch_ends.append(now)
        value = float(logs.get(self.objective, float("nan")))
        if value == value and (self._trial_best is None or (
                value > self._trial_best if self.direction == "max"
                else value < self._trial_best)):
            self._trial_best = value
        ends = [self._started, *self._epoch_ends]
        steps = [later - earlier for earlier, later in zip(ends, ends[1:])]
        # The first epoch also builds the model and traces its training step; once there
        # are later ones, they say better what an epoch takes.
        per_epoch = sum(steps[1:]) / len(steps[1:]) if len(steps) > 1 else steps[0]
        # Hyperband's and a funnel's trials have their own number of epochs; a resumed
        # trial's epoch numbers count the epochs an earlier process trained.
        values = trial.hyperparameters.values
        epochs = max(int(values.get("tuner/epochs", values.get(funnel.EPOCHS, self.epochs))),
                     epoch + 1)
        trial_left = per_epoch * (epochs - epoch - 1)
        place = self.earlier + self.ended + 1
        finished = self._trial_seconds
        per_trial = (sum(finished) / len(finished) if finished
                     else now - self._started + trial_left)
        search_left = trial_left + max(0, self.total - place) * per_trial
        time_limited = False
        if self.time_limit is not None:
            limit_left = max(0.0, self.time_limit - self._spent())
            if limit_left < search_left:
                search_left, time_limited = limit_left, True
        best = self._trial_best if self._trial_best is not None else float("nan")
        return EpochEnded(trial.trial_id, place, self.total, epoch + 1, epochs,
                          self.objective, value, best, trial_left, search_left, time_limited)

    def _flush(self, opened: concurrent.futures.Future, metrics: list) -> None:
        if opened.exception() is None:  # else the trial fails on that error already
            self.tracker.log_batch(opened.result(), metrics)

    def trial_ended(self, trial, architecture, history, fit_seconds, error,
                    measured: dict | None = None, notes: dict | None = None) -> None:
        """Close the trial's run: its status, its best objective, `measured` (more
        metrics: its latency) and `notes` (more tags)."""
        self.batch_ended()  # a trial that never trained gets its run too
        self.ended += 1
        try:
            run_id = self._opened.result()
        except Exception as failure:  # its run could not be written: the trial fails
            self.callback.on_message(
                f"trial {trial.trial_id} ({self.earlier + self.ended}/{self.total}): "
                f"{self.objective} FAILED  (MLflow: {failure.__class__.__name__}: {failure})")
            if isinstance(error, (KeyboardInterrupt, tracking.Interrupted)):
                raise error from failure  # an interruption still stops the search
            raise
        self.runs[trial.trial_id] = run_id
        failed_flush = next((f.exception() for f in self._flushes if f.exception()), None)
        if error is None and failed_flush is not None:
            error = failed_flush  # its metrics could not be written: the trial fails
        status = "FINISHED"
        metrics = {"fit_time_s": fit_seconds, **(measured or {})}
        tags, weights = dict(notes or {}), None
        over = self._over_budget(metrics) if error is None else None
        if over:
            tags[tracking.TAG_OVER_BUDGET] = over
        if history is not None:
            values = [v for v in history.get(self.objective, []) if v == v]
            if values:
                best = max(values) if self.direction == "max" else min(values)
                metrics["objective"] = best
                metrics[f"best_{self.objective}"] = best
                metrics["epochs_trained"] = len(history[self.objective])
                better = self.best is None or (best > self.best if self.direction == "max"
                                               else best < self.best)
                chosen = error is None and not over  # what the final model may take
                self.best = best if better and chosen else self.best
                if chosen:
                    weights = self._weights_to_keep(trial.trial_id, best)
        if error is not None:
            status = ("KILLED" if isinstance(error, (KeyboardInterrupt, tracking.Interrupted))
                      else "FAILED")
            tags[tracking.TAG_ERROR] = (f"{error.__class__.__name__}: "
                                        f"{str(error) or 'interrupted'}")[:5000]
        self._writer.submit(self._close_run, run_id, status,
                            self._pending + self.tracker.metrics(metrics), tags,
                            weights).result()
        seconds = time.perf_counter() - self._started
        self._trial_seconds.append(seconds)
        self.callback.on_trial_end(TrialEnded(
            trial.trial_id, self.earlier + self.ended, self.total, self.objective,
            metrics.get("objective"), self.best, architecture.params, seconds, status, run_id,
            tags.get(tracking.TAG_ERROR)))
        if over:
            self.callback.on_message(f"trial {trial.trial_id} is over the latency budget "
                                     f"({over}): never chosen")
        if failed_flush is not None and error is failed_flush:
            raise failed_flush  # KerasTuner records the trial as failed

    def _over_budget(self, metrics: dict) -> str | None:
        """Why a trial must not be chosen for the final model: its measured latency is over
        `max_latency_ms`, or could not be measured; None when it may be."""
        if self.max_latency_ms is None:
            return None
        measured = metrics.get("latency_ms")
        if measured is None:
            return "latency not measured"
        if measured > self.max_latency_ms:
            return f"latency {measured:.4g} ms > {self.max_latency_ms:g} ms"
        return None

    def _weights_to_keep(self, trial_id: str, score: float):
        """The trial's checkpoint if it is among the best `keep` finished so far, else None."""
        better = sum(s > score if self.direction == "max" else s < score for s in self.scores)
        self.scores.append(score)
        checkpoint = self.project_dir / f"trial_{trial_id}" / tracking.WEIGHTS
        return checkpoint if better < self.keep and checkpoint.is_file() else None

    def _close_run(self, run_id: str, status: str, metrics: list, tags: dict,
                   weights=None) -> None:
        self._unclosed.discard(run_id)
        try:
            if weights is not None:
                self.tracker.log_artifact(run_id, weights)
            self.tracker.log_batch(run_id, metrics, tags=tags)
        finally:
            self.tracker.end(run_id, status)  # a trial's run is always closed

    def _close_unclosed(self) -> None:
        for run_id in list(self._unclosed):
            self._close_run(run_id, "KILLED", [], {tracking.TAG_ERROR: "interrupted"})
