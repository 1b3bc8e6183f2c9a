"""Cheap looks before expensive ones: how a time-limited search on large data spends it.

On data of real size a trial costs minutes, so a search given `--time-limit` spends its
time as an expert would (successive halving over data size and epochs, in two rungs):

1. **Looks.** For the first `LOOK_BUDGET` of the limit, candidates are trained on a
   stratified `LOOK_SHARE` of the training data for `LOOK_EPOCHS` epochs (the oracle
   chooses them: known-good seeds, then one-knob moves of the best looks, each starting
   from its parent's weights). Every look is a trial with its own MLflow run; its
   fidelity is in its values (`SHARE`, `EPOCHS`), so the UI shows the funnel.
2. **Full trainings.** The best looks, ranked on the validation data, are trained on all
   the training data, each starting from its look's weights (`PARENT`), for the epochs
   the time left allows: as many of them as the final model averages (`--ensemble`) when
   each still gets `ENSEMBLE_EPOCHS`, else fewer, at least one (one long training beats
   several short ones averaged; bench/README.md); a later one, after the first ended, needs
   `MIN_FULL_EPOCHS`.
3. **What is left** goes to more looks while one fits; then the search stops, leaving the
   final model its share of the limit (`reserve`).

Costs are predicted from what the search measured: seconds per unit of work, a unit
being a FLOP of the candidate's forward pass on one image (`VALIDATION_COST` of one for a
validation image, which is not trained on), from the candidate's own look when it had
one, else the median over the trials so far.

Pure planning: no TensorFlow, no KerasTuner. `nas.oracles` asks it what to do next.
"""

from __future__ import annotations

import dataclasses
import statistics

__all__ = ["SHARE", "EPOCHS", "PARENT", "FIDELITY_KEYS", "MIN_SAMPLES", "Funnel", "Step",
           "Trained", "architecture_values", "fidelity", "from_params"]

SHARE = "nas/share"  # a trial's share of the training data (1.0: all of it)
EPOCHS = "nas/epochs"  # the epochs a trial is given (its learning rate decays over them)
PARENT = "nas/parent"  # the trial whose best weights a trial starts from ("": none)
FIDELITY_KEYS = (SHARE, EPOCHS, PARENT)

MIN_SAMPLES = 10_000  # training samples from which a time-limited search looks first
LOOK_SHARE = 0.2
LOOK_EPOCHS = 3
LOOK_BUDGET = 0.3  # of the limit: the looks before the first full training
MIN_FULL_EPOCHS = 8  # a full training given fewer is not worth its time beside another's
ENSEMBLE_EPOCHS = 20  # what each full training gets before the time is split among more
VALIDATION_COST = 1 / 3  # a validation image is only a forward pass: a third of a step
RESERVE_SHARE, RESERVE_SECONDS = 0.03, 15.0  # the final model's part of the limit


@dataclasses.dataclass(frozen=True)
class Trained:
    """A trial as the funnel sees it: its fidelity, score and measured wall time."""

    trial_id: str
    share: float
    epochs: int
    score: float | None  # its objective on the validation data (None: failed)
    seconds: float  # wall time, from its start to its end
    flops: int  # of the candidate's forward pass on one image
    parent: str | None = None  # the look a full training started from


@dataclasses.dataclass(frozen=True)
class Step:
    """What to train next: a look at a candidate the oracle picks (`parent` None), or the
    full training of the look `parent` for `epochs`."""

    kind: str  # "look" or "full"
    share: float
    epochs: int
    parent: str | None = None


def architecture_values(values: dict) -> dict:
    """A trial's values without its fidelity: the candidate itself."""
    return {k: v for k, v in values.items() if k not in FIDELITY_KEYS}


def from_params(params: dict) -> dict:
    """A trial's fidelity values as its MLflow run's params hold them (strings), or {}."""
    if SHARE not in params:
        return {}
    return {SHARE: float(params[SHARE]), EPOCHS: int(params[EPOCHS]),
            PARENT: params.get(PARENT, "")}


def fidelity(values: dict) -> tuple[float, int | None]:
    """A trial's (share, epochs): (1.0, None) for a trial outside any funnel."""
    epochs = values.get(EPOCHS)
    return float(values.get(SHARE, 1.0)), (int(epochs) if epochs is not None else None)


class Funnel:
    """Plans a time-limited search's trials: looks, then full trainings of the best.

    Args:
        limit: the search's time limit, in seconds.
        train_samples, validation_samples: the sizes of the two splits.
        finalists: the most full trainings (the final model's `--ensemble`).
        direction: "max" or "min", the objective's.
        refit: the final model retrains its trials on the training and validation data
            (`--refit`), inside the limit: each full training's time is matched by its
            refit's (on `refit_cost` times the data), held back from what follows.
    """

    def __init__(self, limit: float, train_samples: int, validation_samples: int,
                 finalists: int, direction: str, refit: bool = False):
        self.limit = float(limit)
        self.train_samples, self.validation_samples = train_samples, validation_samples
        self.finalists, self.direction = max(1, finalists), direction
        self.reserve = max(RESERVE_SECONDS, RESERVE_SHARE * self.limit)
        self.refit_cost = ((train_samples + validation_samples) / max(1, train_samples)
                           if refit else 0.0)

    def units(self, flops: int, share: float) -> float:
        """The work of one epoch of a candidate of `flops` on `share` of the data."""
        return flops * (share * self.train_samples
                        + VALIDATION_COST * self.validation_samples)

    def epoch_seconds(self, flops: int, share: float, trained: list[Trained],
                      own: Trained | None = None) -> float | None:
        """What an epoch of a candidate of `flops` on `share` of the data will take: from
        its `own` look when it had one, else the median rate of `trained` (None: no
        measurement yet)."""
        measured = [own] if own is not None and own.seconds > 0 else trained
        rates = [t.seconds / (t.epochs * self.units(t.flops, t.share)) for t in measured
                 if t.epochs and t.flops and t.seconds > 0]
        if not rates:
            return None
        return statistics.median(rates) * self.units(flops, share)

    def left(self, elapsed: float, trained: list[Trained] = ()) -> float:
        """The seconds trials may still take: the final model's part held back, and with
        `refit` what retraining the full trainings in `trained` will take."""
        owed = self.refit_cost * sum(t.seconds for t in trained if t.share >= 1)
        return self.limit - self.reserve - elapsed - owed

    def full_seconds(self, left: float) -> float:
        """Of `left` seconds, what full trainings may take (with `refit`, their refits
        take the rest)."""
        return left / (1 + self.refit_cost)

    def look_fits(self, flops: int, elapsed: float, trained: list[Trained]) -> bool:
        """Whether a look at a candidate of `flops` ends in time."""
        seconds = self.epoch_seconds(flops, LOOK_SHARE, trained)
        return seconds is None or LOOK_EPOCHS * seconds <= self.left(elapsed, trained)

    def next(self, elapsed: float, trained: list[Trained],
             running: tuple[str, ...] = ()) -> Step | None:
        """The next step after `trained` (ended trials, oldest first), `elapsed` seconds
        into the search, while the full trainings of the looks `running` train (other
        Ray tasks'); None when nothing fits in the time left.

        A "look" step still needs the oracle's candidate, and `look_fits` for it.
        """
        looks = [t for t in trained if t.share < 1]
        fulls = [t for t in trained if t.share >= 1]
        left = self.left(elapsed, trained)
        look = Step("look", LOOK_SHARE, LOOK_EPOCHS)
        if not looks or (not fulls and elapsed < LOOK_BUDGET * self.limit):
            return look if left > 0 else None
        promoted = {t.parent for t in fulls} | set(running)
        candidates = self._ranked([t for t in looks if t.trial_id not in promoted
                                   and t.score is not None])
        fulls_so_far = len(fulls) + len(running)
        if candidates and fulls_so_far < self.finalists:
            best = candidates[0]
            per_epoch = self.epoch_seconds(best.flops, 1.0, trained, own=best)
            if per_epoch is None:  # no time measured (a state rebuilt from MLflow): look
                return look if left > 0 else None
            # How many full trainings the time left holds at `ENSEMBLE_EPOCHS` each (at
            # least one), and this one's share of the time; after the first, one more
            # only when it gets `MIN_FULL_EPOCHS`.
            for_fulls = self.full_seconds(left)
            room = int(for_fulls // (ENSEMBLE_EPOCHS * per_epoch))
            count = min(self.finalists - fulls_so_far, max(room, 1))
            epochs = int(for_fulls / count // per_epoch)
            if epochs >= (MIN_FULL_EPOCHS if fulls_so_far else 1):
                return Step("full", 1.0, epochs, best.trial_id)
        return look if left > 0 else None

    def _ranked(self, looks: list[Trained]) -> list[Trained]:
        return sorted(looks, key=lambda t: t.score, reverse=self.direction == "max")
