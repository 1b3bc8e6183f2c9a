"""The one place a search's parts are put together: used by the one-process search
(`nas.search.run`), the driver of a search on Ray (the same) and every Ray worker process
that trains its trials (`nas.scaleout`).

`Parts` holds the hypermodel (`nas.tuning.CandidateModel`), the trial runs' hooks
(`nas.trial_runs.TrialRuns`) and makes the oracle and the tuner from the search's
settings; `interruptions` turns signals into `Interrupted` while a search runs, so every
run closes as KILLED. Also here, started explicitly by whoever runs a search, never at
import time: TensorFlow's settings (`configure_tensorflow`) and the imports a search
would otherwise pay for in its first and last trials (`import_ahead`).

The performance tricks, and where each is started (none at import time):

- the imports ahead (`import_ahead`): by `nas.search.run`, the one-process search and
  the driver on Ray, before the search's run starts;
- `gc.freeze()`: by `nas.search.run` once the tuner is open, so that each trial's
  collection scans the trials' own objects only, not TensorFlow's and MLflow's modules;
- TensorFlow's gradient registry purged after each trial (`NasTuner`'s
  `forget_gradients`, `nas.tfcompat.forget_custom_gradients`): by `Parts.tuner`, so in
  every process that trains, the Ray workers' included.

Nothing here imports TensorFlow or KerasTuner at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import signal

from nas import tracking
from nas.errors import Interrupted
from nas.settings import SearchConfig
from nas.trial_runs import TrialRuns

__all__ = ["Parts", "assemble", "configure_tensorflow", "import_ahead", "interruptions",
           "latency_guard", "raise_interrupted", "strategy"]

# What a search imports lazily once it runs: KerasTuner's TensorBoard support in its first
# trial (which pulls in boto3); MLflow's model flavor, pyfunc, git context and the tracing
# processors that setting its tracking URI resets, when the best model is logged;
# matplotlib's Agg canvas for the plot. Imported before the search's run starts, so that
# start-up is paid at start-up, not by the first and last trials.
IMPORT_AHEAD = ("tensorboard.plugins.hparams.api", "mlflow.tensorflow", "mlflow.pyfunc", "git",
                "mlflow.tracing.processor.base_mlflow", "mlflow.tracing.processor.otel",
                "matplotlib.figure", "matplotlib.backends.backend_agg")
DISTRIBUTIONS = ("mirrored",)


@dataclasses.dataclass
class Parts:
    """A search's hypermodel and trial runs, and how its oracle and tuner are made."""

    config: SearchConfig
    hypermodel: object  # nas.tuning.CandidateModel
    hooks: TrialRuns
    samples: tuple[int, int] = (0, 0)  # training and validation samples
    # The guard of `max_latency_ms` (a nas.latency_table.LatencyGuard), where the oracle
    # is guarded: the search's own process, or the driver of a search on Ray.
    latency: object = None

    @property
    def funnel(self):
        """The plan of a search that looks before it trains (`nas.funnel`), or None: the
        default tuner given a time limit, on at least `funnel.MIN_SAMPLES` training images."""
        from nas import funnel

        config = self.config
        if (config.tuner != "evolution" or config.budget.time_limit is None
                or self.samples[0] < funnel.MIN_SAMPLES):
            return None
        return funnel.Funnel(config.budget.time_limit, *self.samples, config.final.ensemble,
                             config.pipeline.direction, refit=config.final.refit)

    def oracle(self, guarded: bool = True, on_reject=None):
        """The search's oracle. `guarded`: impossible and over-budget candidates are
        rejected inside it (a Ray task's oracle only holds its trial: the driver's
        proposes); `on_reject` receives each `nas.architecture.Rejection`."""
        import keras_tuner as kt

        from nas import oracles

        config, pipeline = self.config, self.config.pipeline
        constraints = config.constraints
        oracle = oracles.make_oracle(
            config.tuner, oracles.declare(config.space),
            kt.Objective(pipeline.objective, pipeline.direction),
            max_trials=config.budget.max_trials, seed=config.seed,
            max_epochs=config.epochs_per_trial, max_failures=config.budget.max_failures,
            check=((lambda values: self.hypermodel.check(values, constraints, self.latency))
                   if guarded else (lambda values: None)),
            time_limit=config.budget.time_limit if guarded else None,
            funnel=(self.funnel, lambda values: self.hypermodel.architecture(values).flops)
            if guarded and self.funnel is not None else None,
        )
        oracle.on_reject(on_reject)
        return oracle

    def tuner(self, oracle):
        """The search's tuner over `oracle`, its state in the working folder reloaded."""
        from nas import tuning

        config, pipeline = self.config, self.config.pipeline
        with contextlib.redirect_stdout(io.StringIO()):  # KerasTuner's "Reloading ..."
            return tuning.NasTuner(
                oracle, self.hypermodel, self.hooks,
                stopping=tuning.stopping_rule(config.tuner, pipeline.objective,
                                              pipeline.direction),
                forget_gradients=True,  # see the module's doc
                directory=config.workdir, project_name=config.project_name, overwrite=False,
                distribution_strategy=strategy(config.scale.distribution),
                latency=latency_meter(config))

    def search(self, tuner, datasets) -> None:
        """Train the trials `tuner`'s oracle proposes, on `datasets`, until it stops."""
        from nas import tuning

        config, pipeline = self.config, self.config.pipeline
        tuner.shares = datasets.share  # a look's share of the training data (nas.funnel)
        tuner.search(datasets.train, validation_data=datasets.validation,
                     epochs=config.epochs_per_trial, verbose=0, shuffle=False,
                     callbacks=tuning.early_stopping(pipeline.objective, pipeline.direction,
                                                     pipeline.early_stopping_patience))


def latency_meter(config: SearchConfig):
    """What measures a model's latency as `config` asks (`nas.latency.measure`), or None."""
    if config.latency_engine is None:
        return None
    from nas import latency

    return functools.partial(latency.measure, engine=config.latency_engine,
                             threads=config.latency_threads)


def latency_guard(config: SearchConfig, table):
    """The guard that keeps candidates the per-layer `table` predicts over
    `max_latency_ms` from being trained (`nas.latency_table.LatencyGuard`), measuring the
    layers it lacks on this machine unless it was measured elsewhere; None without one."""
    if table is None:
        return None
    from nas import latency
    from nas.latency_table import LatencyGuard

    return LatencyGuard(table, config.max_latency_ms,
                        None if table.fixed else latency.measure_layers)


def assemble(config: SearchConfig, arrays, tracker, experiment_id: str, search_run_id: str,
             callback, latency_table=None) -> Parts:
    """The parts of the search `search_run_id` over `arrays`, reporting to `callback`;
    with `latency_table`, their oracle guards the latency budget."""
    from nas import tuning

    hypermodel = tuning.CandidateModel(config.space, arrays.input_shape, arrays.num_classes,
                                       arrays.pixel_scale, jit_compile=config.jit_compile,
                                       mixed_precision=config.mixed_precision,
                                       augment=config.pipeline.augment,
                                       label_smoothing=config.pipeline.label_smoothing)
    hooks = TrialRuns(tracker, experiment_id, search_run_id, config, callback,
                      config.budget.max_trials)
    return Parts(config, hypermodel, hooks, (len(arrays.y_train), len(arrays.y_val)),
                 latency_guard(config, latency_table))


def strategy(name: str | None):
    """The `tf.distribute` strategy for `distribution`, or None (one device)."""
    from nas.errors import SearchError

    if not name:
        return None
    if name not in DISTRIBUTIONS:
        raise SearchError(f"`distribution`: {name!r} is not one of {list(DISTRIBUTIONS)}")
    import tensorflow as tf

    # One trial over every GPU this process sees (the single CPU when there is none).
    return tf.distribute.MirroredStrategy()


def configure_tensorflow(config: SearchConfig) -> None:
    """GPU memory growth and seeds; before any model is built.

    Mixed precision is not set here: `nas.models.build_model` gives the policy to every
    layer (see there).
    """
    import keras
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # devices already initialized in this process
            pass
    keras.utils.set_random_seed(config.seed)


def import_ahead() -> None:
    """Import now what a search would import in its first and last trials."""
    import importlib

    for name in IMPORT_AHEAD:
        try:
            importlib.import_module(name)
        except ImportError:  # only a head start: whoever needs it imports it (and says so)
            pass
    from PIL import Image

    Image.preinit()  # PIL's image writers (PNG), registered on first save


def raise_interrupted(signum, frame):
    """A signal handler: stop what runs as an `Interrupted` (SIGINT: KeyboardInterrupt), so
    runs close as KILLED. The interruption is also kept (`tracking.pending_interruption`)
    and raised again at the next batch, in case the code it landed in swallowed it."""
    error = (KeyboardInterrupt() if signum == signal.SIGINT
             else Interrupted(f"signal {signal.Signals(signum).name}"))
    tracking.pending_interruption = error
    raise error


@contextlib.contextmanager
def interruptions(sigint: bool = True):
    """While inside: SIGTERM (and SIGINT, where Python's own handler has it) raise
    `raise_interrupted`'s errors; the handlers before are restored after."""
    tracking.pending_interruption = None
    previous = {signum: signal.signal(signum, raise_interrupted)
                for signum in (signal.SIGTERM, signal.SIGINT)
                if signum == signal.SIGTERM
                or (sigint and signal.getsignal(signum) is signal.default_int_handler)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        tracking.pending_interruption = None
