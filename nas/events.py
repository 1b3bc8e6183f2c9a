"""What a search reports as it runs: events, and the callback object that receives them.

As Keras's and KerasTuner's callbacks: subclass `Callback`, override the methods you need,
and give it to `nas.search.run` (or `nas.scaleout.run`). The library prints
nothing itself (without a callback, a search reports to nobody); `Printer` is the
callback that prints a search's lines where it is told (the CLI's), `line` the one line
an event reads as. Nothing here imports TensorFlow or MLflow.
"""

from __future__ import annotations

import dataclasses

from nas.errors import render
from nas.settings import UNCAPPED_TRIALS

__all__ = ["Callback", "CandidateRejected", "EpochEnded", "Printer", "SearchEnded",
           "TrialEnded", "TrialStarted", "line"]


@dataclasses.dataclass(frozen=True)
class TrialStarted:
    """A trial starts training (its run opens at its first batch). `resumed_at`: the
    epoch (1-based) it goes on at, when an earlier process trained the ones before."""

    trial_id: str
    trial: int  # its place in the search, 1-based
    trials: int  # the search's budget of trials
    resumed_at: int | None = None


@dataclasses.dataclass(frozen=True)
class EpochEnded:
    """An epoch of a trial has ended.

    The times left are estimates, in seconds: `trial_left` is the trial's remaining
    epochs at the mean time of its epochs so far (early stopping may end it sooner);
    `search_left` adds the trials left at the mean time of a trial, or is what the time
    limit leaves when that is less (`time_limited`; the search starts no trial after).
    """

    trial_id: str
    trial: int  # its place in the search, 1-based, as in the line that ends it
    trials: int  # the search's budget of trials
    epoch: int  # epochs trained, 1-based
    epochs: int  # the trial's epochs, unless early stopping ends it first
    objective: str
    value: float  # this epoch's objective (nan when the epoch did not report it)
    best: float  # the trial's best so far
    trial_left: float
    search_left: float
    time_limited: bool


@dataclasses.dataclass(frozen=True)
class TrialEnded:
    """A trial has ended and its MLflow run is closed. `status` is its run's: FINISHED,
    FAILED (`error` says why) or KILLED (interrupted)."""

    trial_id: str
    trial: int
    trials: int
    objective: str
    value: float | None  # its best epoch's objective (None when it has none)
    best: float | None  # the search's best so far
    params: int
    seconds: float
    status: str
    run_id: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class CandidateRejected:
    """The oracle rejected a candidate before any model was built: `kind` "impossible"
    (its feature map vanishes at `stage`), "max_params", "max_flops" or "max_latency_ms"
    (predicted over it by the per-layer latency table)."""

    kind: str
    reason: str
    stage: int | None = None


@dataclasses.dataclass(frozen=True)
class SearchEnded:
    """The search has ended (its final model logged): `result` is its `SearchResult`."""

    result: object


class Callback:
    """Receives a search's events; every method does nothing unless overridden."""

    def on_message(self, text: str) -> None:
        """A notice: the search resumed, grew, rebuilt its state, closed stale runs, a
        warning, ..."""

    def on_trial_begin(self, event: TrialStarted) -> None:
        pass

    def on_epoch_end(self, event: EpochEnded) -> None:
        pass

    def on_trial_end(self, event: TrialEnded) -> None:
        pass

    def on_candidate_rejected(self, event: CandidateRejected) -> None:
        pass

    def on_search_end(self, event: SearchEnded) -> None:
        pass


class Printer(Callback):
    """Prints a search's notices and the line each trial ends with, each with `echo(line)`
    (`print`, say, or the CLI's `click.echo`).

    A notice names the parameters it is about in backticks (`overwrite`): printed as
    `name_of(parameter)` calls them (the CLI: `--overwrite`; by default: `overwrite`).
    """

    def __init__(self, echo, name_of=lambda parameter: parameter):
        self.echo, self.name_of = echo, name_of

    def on_message(self, text: str) -> None:
        self.echo(render(text, self.name_of))

    def on_trial_begin(self, event: TrialStarted) -> None:
        if event.resumed_at is not None:
            self.echo(line(event))

    def on_trial_end(self, event: TrialEnded) -> None:
        self.echo(line(event))


def _place(event) -> str:
    """"4/10": the trial's place among the search's trials; "4" where the time limit, not a
    count, ends the search (`nas.settings.UNCAPPED_TRIALS`)."""
    return (f"{event.trial}" if event.trials >= UNCAPPED_TRIALS
            else f"{event.trial}/{event.trials}")


def line(event) -> str:
    """The line an event reads as, as `nas search` prints it."""
    if isinstance(event, TrialEnded):
        place = f"trial {event.trial_id} ({_place(event)})"
        value = float("nan") if event.value is None else event.value
        shown = f"{value:.4f}" if event.error is None else event.status
        best = f"{event.best:.4f}" if event.best is not None else "-"
        return (f"{place}: {event.objective} {shown}  best {best}  params {event.params:,}  "
                f"{event.seconds:.1f} s")
    if isinstance(event, TrialStarted):
        if event.resumed_at is None:
            return f"trial {event.trial_id} ({_place(event)}) starts"
        done = event.resumed_at - 1
        trained = "epoch 1 was" if done == 1 else f"epochs 1-{done} were"
        return (f"trial {event.trial_id} resumes at epoch {event.resumed_at} ({trained} "
                f"trained by an earlier process)")
    if isinstance(event, EpochEnded):
        search = (f"<={duration(event.search_left)} (time limit)" if event.time_limited
                  else f"~{duration(event.search_left)}")
        return (f"trial {event.trial_id} epoch {event.epoch}/{event.epochs}  "
                f"{event.objective} {event.value:.4f} (trial best {event.best:.4f})  left: "
                f"trial <={duration(event.trial_left)}, search {search}")
    if isinstance(event, CandidateRejected):
        return f"candidate rejected ({event.kind}): {event.reason}"
    raise TypeError(f"not an event of nas.events: {event!r}")


def duration(seconds: float) -> str:
    """A time left, short: 4.2s, 42s, 4m02s, 4h02m."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
