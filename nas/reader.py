"""What `nas.results` reads of a tracking store: experiments and runs, through a `Reader`.

Two readers implement it: `nas.results`'s on `MlflowClient` (any store) and
`nas.mlflow_sqlite`'s on a local SQLite store's tables (no MLflow import). Both give the
same `Run`s and `Experiment`s, so that results cannot tell which one answered. Standard
library only: this module sits below both.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nas import tracking

__all__ = ["Experiment", "Run", "Reader"]


@dataclasses.dataclass(frozen=True)
class Experiment:
    experiment_id: str
    name: str
    lifecycle_stage: str


@dataclasses.dataclass(frozen=True)
class Run:
    """What results needs of an MLflow run, whichever reader read it."""

    run_id: str
    experiment_id: str
    status: str
    artifact_uri: str
    tags: dict
    params: dict
    metrics: dict


class Reader:
    """Reads experiments and runs from one tracking store, as `MlflowClient` would.

    Made by `nas.results.open_reader`. `tracker` is a `nas.tracking.Tracker` on the same
    store, for what only MLflow does (artifacts, models); reading never needs it.
    """

    tracking_uri: str

    @property
    def tracker(self) -> tracking.Tracker:
        raise NotImplementedError

    def experiments(self) -> list[Experiment]:
        """The active experiments, newest first (MLflow's default page: the first 1000)."""
        raise NotImplementedError

    def experiment(self, experiment_id: str) -> Experiment:
        raise NotImplementedError

    def experiment_by_name(self, name: str) -> Experiment | None:
        """The experiment called `name`, deleted or not; None if there is none."""
        raise NotImplementedError

    def latest_search(self, experiment_ids: list[str]) -> Run | None:
        """The active search run started last in any of `experiment_ids`."""
        raise NotImplementedError

    def run(self, run_id: str) -> Run | None:
        """The run `run_id`, deleted or not; None if there is none."""
        raise NotImplementedError

    def trial_runs(self, experiment_id: str, search_run_id: str) -> list[Run]:
        """The active trial runs of one search, oldest first."""
        raise NotImplementedError
