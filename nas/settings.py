"""A search's settings, by role, and where its state lives: one source, read by every other part.

`SearchConfig` is everything one search needs (CLI flags land here), split as Optuna
splits `create_study` from `optimize`: what the search is (its specs, tuner and how its
trials train) and where it lives, then three groups of their own: its `Budget`, its
`FinalModel` and how it scales out (`ScaleOut`). From it come the two views of a search's
settings that must agree: what must match for it to resume (`fingerprint`) and what its
MLflow run logs as params (`params`). Also here: the layout of its state (the working
folder's project folder, the state file) and the tuners' names. The CLI's defaults are
these dataclasses' defaults. No TensorFlow, no MLflow.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from pathlib import Path

from nas import tracking  # its tag names only: MLflow is not imported
from nas.specs import Constraints, Pipeline, SearchSpace

__all__ = ["Budget", "DEFAULT_TUNER", "FinalModel", "LOCAL_RAY", "MAX_TRIALS", "ScaleOut",
           "SearchConfig", "STATE_FILE", "TAG_DATA_DIGEST", "TAG_FINGERPRINT", "TAG_MAX_TRIALS",
           "TUNERS", "UNCAPPED_TRIALS", "project_folder"]

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
LOCAL_RAY = ""  # `ScaleOut.ray` (`--ray` without an address): a Ray started for the search


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a search may spend: not what identifies it (a larger budget grows a search)."""

    max_trials: int = MAX_TRIALS  # trials to train (rejected candidates do not count)
    time_limit: float | None = None  # seconds, the final model included; whichever first
    max_failures: int = 3  # consecutive failed trials that end the search


@dataclasses.dataclass(frozen=True)
class FinalModel:
    """What a search makes of its best trials once they are trained."""

    ensemble: int = 3  # the final model averages the best this many trials (bench: quality)
    refit: bool = False  # retrain the final model's trials on training + validation data
    register: str | None = None  # Model Registry name for the final model


@dataclasses.dataclass(frozen=True)
class ScaleOut:
    """How a search spreads over devices and processes (`nas.scaleout`)."""

    distribution: str | None = None  # "mirrored": one trial over all its process's GPUs
    # On Ray (`nas.scaleout`): the cluster's address (`LOCAL_RAY`: a local Ray started for
    # the search and stopped after it; "auto": the one RAY_ADDRESS or a running local head
    # names; None: not on Ray), and what each trial asks of it.
    ray: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions share a GPU
    max_concurrent: int | None = None  # trials at once; None: what the cluster holds
    max_retries: int = 2  # Ray runs a trial's task again when its process or node dies


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Everything one search needs, by role; CLI flags land here.

    Every setting can be given by its own name, a group's too: `max_trials=5` is
    `budget=Budget(max_trials=5)` (and `dataclasses.replace` takes them so as well).
    """

    space: SearchSpace
    pipeline: Pipeline
    # What the search is: its tuner and how its trials train (`fingerprint` takes what
    # must match for it to resume).
    tuner: str = DEFAULT_TUNER
    epochs: int | None = None  # per trial; None: the pipeline's
    batch_size: int | None = None  # None: the pipeline's
    seed: int = 0
    max_params: int | None = None  # per candidate, with the specs' own (`constraints`)
    max_flops: int | None = None
    mixed_precision: bool = False
    jit_compile: bool = False
    # What is measured besides the objective: each trained trial's and the final model's
    # latency at batch size 1, run by this engine ("tflite", "keras"; None: not measured)
    # on this many threads (`nas.latency`).
    latency: str | None = None
    latency_threads: int = 1
    # A trial measured slower is never chosen, and the final model is kept under it
    # (ms at batch size 1; None: no budget; set, the latency is measured). A candidate
    # its per-layer table (`nas.latency_table`) predicts slower is not trained.
    max_latency_ms: float | None = None
    # That table: a file measured on another device; None: this machine's, measured as
    # the search meets new layers and cached.
    latency_table: str | None = None
    # Where it lives: its experiment, tracking store and working folder.
    experiment: str | None = None  # None: SPACE-PIPELINE
    tracking_uri: str | None = None  # None: MLflow's own rule
    workdir: str = ".nas"
    overwrite: bool = False  # start afresh instead of resuming
    skip_bad_images: bool = False  # leave a directory's unreadable files out (else refused)
    budget: Budget = dataclasses.field(default_factory=Budget)
    final: FinalModel = dataclasses.field(default_factory=FinalModel)
    scale: ScaleOut = dataclasses.field(default_factory=ScaleOut)

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"{self.space.name}-{self.pipeline.name}"

    @property
    def latency_engine(self) -> str | None:
        """What measures the latency: `latency`, else TFLite when a budget needs it."""
        return self.latency or ("tflite" if self.max_latency_ms is not None else None)

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

    def params(self) -> dict:
        """The settings the search's MLflow run logs as params (its specs are artifacts)."""
        constraints = self.constraints
        return {
            "space": self.space.name, "pipeline": self.pipeline.name,
            "tuner": self.tuner, "max_trials": self.budget.max_trials,
            "epochs": self.epochs_per_trial,
            "batch_size": self.batch_size or self.pipeline.batch_size, "seed": self.seed,
            "objective": self.pipeline.objective, "max_failures": self.budget.max_failures,
            "max_params": constraints.max_params, "max_flops": constraints.max_flops,
            "mixed_precision": self.mixed_precision, "jit_compile": self.jit_compile,
            "ensemble": self.final.ensemble, "refit": self.final.refit,
            **({"latency": self.latency_engine, "latency_threads": self.latency_threads,
                "max_latency_ms": self.max_latency_ms} if self.latency_engine else {}),
            **({"latency_table": self.latency_table} if self.latency_table else {}),
        }


_GROUPS = {"budget": Budget, "final": FinalModel, "scale": ScaleOut}


def _by_name(init):
    """`SearchConfig.__init__` taking a group's settings by their own names as well."""
    @functools.wraps(init)
    def __init__(self, space: SearchSpace, pipeline: Pipeline, **settings):
        for group, kind in _GROUPS.items():
            given = {f.name: settings.pop(f.name) for f in dataclasses.fields(kind)
                     if f.name in settings}
            if given:
                settings[group] = dataclasses.replace(settings.get(group) or kind(), **given)
        init(self, space, pipeline, **settings)
    return __init__


SearchConfig.__init__ = _by_name(SearchConfig.__init__)


def project_folder(experiment_name: str) -> str:
    """The folder, inside the working folder, that holds a search's KerasTuner state.

    Only word characters, dots and dashes, and no leading dot: an experiment name can
    never point outside the working folder (`--overwrite` deletes this folder).
    """
    return re.sub(r"[^\w.-]+", "_", experiment_name).lstrip(".") or "search"


