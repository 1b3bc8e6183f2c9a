"""A search's settings, and where its state lives: one source, read by every other part.

`SearchConfig` is everything one search needs (CLI flags land here). From it come the
three views of a search's settings that must agree: what must match for it to resume
(`fingerprint`), what its MLflow run logs as params (`params`), and what a worker of a
distributed search takes from its chief (`worker_settings`, `for_worker`). Also here:
the layout of its state (the working folder's project folder, the state file) and the
tags its run is found again by. No TensorFlow, no MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from nas import tracking  # its tag names only: MLflow is not imported
from nas.specs import Constraints, Pipeline, SearchSpace

__all__ = ["MAX_TRIALS", "SearchConfig", "STATE_FILE", "UNCAPPED_TRIALS", "TAG_DATA_DIGEST", "TAG_FINGERPRINT", "TAG_MAX_TRIALS",
           "project_folder"]

STATE_FILE = "nas_search.json"  # in a search's project folder: its run id and settings
# The tags of the search's run these settings are found again by (named in nas.tracking).
TAG_FINGERPRINT, TAG_DATA_DIGEST = tracking.TAG_FINGERPRINT, tracking.TAG_DATA_DIGEST
TAG_MAX_TRIALS = tracking.TAG_MAX_TRIALS
# --tuner: the names of `nas.oracles.ORACLES`, where each is made (KerasTuner not imported).
TUNERS = ("evolution", "random", "bayesian", "hyperband", "grid")
DEFAULT_TUNER = "evolution"
MAX_TRIALS = 10  # --max-trials without --time-limit
# --max-trials with --time-limit: as many trials as the time holds (lines show no total).
UNCAPPED_TRIALS = 1000
# What a worker trains with, taken from its chief's settings (`for_worker`).
_WORKER_TRAINING = ("tuner", "max_trials", "epochs", "batch_size", "seed", "mixed_precision",
                    "jit_compile")


@dataclasses.dataclass
class SearchConfig:
    """Everything one search needs; CLI flags land here."""

    space: SearchSpace
    pipeline: Pipeline
    tuner: str = DEFAULT_TUNER
    max_trials: int = MAX_TRIALS
    time_limit: float | None = None  # seconds; with max_trials, whichever comes first
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    experiment: str | None = None
    tracking_uri: str | None = None
    workdir: str = ".nas"
    overwrite: bool = False
    max_failures: int = 3
    max_params: int | None = None
    max_flops: int | None = None
    mixed_precision: bool = False
    jit_compile: bool = False
    register: str | None = None  # Model Registry name for the final model
    ensemble: int = 3  # the final model averages the best this many trials (bench: quality)
    refit: bool = False  # retrain the final model's trials on training + validation data
    skip_bad_images: bool = False  # leave a directory's unreadable files out (else refused)
    # Scale-out (nas.distributed): "mirrored" trains one trial over all local GPUs;
    # `chief` HOST:PORT makes this process the chief (or, with `worker_id`, a worker).
    distribution: str | None = None
    chief: str | None = None
    worker_id: str | None = None
    worker_timeout: float = 60.0  # seconds of silence after which a worker is lost
    # The secret a worker shows the chief on every call (`nas.distributed`): the chief's
    # own (given, or made for the search), or the one a worker was given.
    worker_token: str | None = None
    # TLS for the chief's gRPC port: its certificate and key (PEM); a worker's CA (PEM).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"{self.space.name}-{self.pipeline.name}"

    @property
    def epochs_per_trial(self) -> int:
        return self.epochs or self.pipeline.epochs

    @property
    def constraints(self) -> Constraints:
        """The tightest of the budgets given by flags, the pipeline and the space."""
        return Constraints.tightest(Constraints(self.max_params, self.max_flops),
                                    self.pipeline.constraints, self.space.constraints)

    @property
    def project_name(self) -> str:
        return project_folder(self.experiment_name)

    @property
    def project_dir(self) -> Path:
        return Path(self.workdir) / self.project_name

    def fingerprint(self) -> str:
        """What must match for a search to resume: the specs and the tuner settings. Not
        its budget (`max_trials`, `time_limit`): a larger one grows the search."""
        parts = [self.space.text, self.pipeline.text, self.tuner, str(self.epochs_per_trial),
                 str(self.batch_size), str(self.seed), str(self.constraints)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]

    def settings(self) -> dict:
        """The search's settings as its run and its workers know them (the one list)."""
        constraints = self.constraints
        return {
            "space": self.space.name, "space_sha": _digest(self.space.text),
            "pipeline": self.pipeline.name, "pipeline_sha": _digest(self.pipeline.text),
            "tuner": self.tuner, "max_trials": self.max_trials,
            "epochs": self.epochs_per_trial,
            "batch_size": self.batch_size or self.pipeline.batch_size, "seed": self.seed,
            "objective": self.pipeline.objective, "max_failures": self.max_failures,
            "max_params": constraints.max_params, "max_flops": constraints.max_flops,
            "mixed_precision": self.mixed_precision, "jit_compile": self.jit_compile,
            "ensemble": self.ensemble, "refit": self.refit,
        }

    def params(self) -> dict:
        """The settings the search's MLflow run logs as params (its specs are artifacts)."""
        return {k: v for k, v in self.settings().items() if not k.endswith("_sha")}

    def worker_settings(self, arrays) -> dict:
        """What every worker must train with, on the chief's `arrays` (`nas.data.Arrays`:
        a directory's files must be the same); stored on the parent run by the chief."""
        settings = self.settings()
        return {**{k: settings[k] for k in ("space", "space_sha", "pipeline", "pipeline_sha",
                                            *_WORKER_TRAINING)},
                "data_digest": arrays.data_digest, "data_files": arrays.samples}

    def for_worker(self, chief_settings: dict) -> SearchConfig:
        """This worker's config, training as the chief's `worker_settings` say."""
        return dataclasses.replace(self, **{k: chief_settings[k] for k in _WORKER_TRAINING})

    def differs_from(self, chief_settings: dict) -> str | None:
        """The spec ("space" or "pipeline") this worker has other than its chief, or None."""
        mine = self.settings()
        return next((kind for kind in ("space", "pipeline")
                     if chief_settings[f"{kind}_sha"] != mine[f"{kind}_sha"]), None)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def project_folder(experiment_name: str) -> str:
    """The folder, inside the working folder, that holds a search's KerasTuner state.

    Only word characters, dots and dashes, and no leading dot: an experiment name can
    never point outside the working folder (`--overwrite` deletes this folder).
    """
    return re.sub(r"[^\w.-]+", "_", experiment_name).lstrip(".") or "search"


