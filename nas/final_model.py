"""A search's final model in MLflow: made, scored once on the test data, logged.

At the end of `nas search`, `log_best_model` makes the final model (the best trial's
weights at its best epoch, an ensemble of the best K, or those retrained with `--refit`;
each on the image and its mirror image too with the pipeline's `train.test_time_flips`),
scores it on the held-out test data and logs it as the MLflow model of the search's run
(`runs:/<search run>/model`), registering it when asked. The pieces `nas.export` builds
on live here too: a trial's model from its `Architecture` and weights (KerasTuner's
checkpoint, or the weights logged to its run), and MLflow's fluent API on a given store.

TensorFlow and MLflow's model flavour are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
import warnings
from pathlib import Path

from nas import funnel, mlflowcompat, results, tracking

__all__ = ["CHAMPION", "CHECKPOINT", "MODEL_NAME", "TAG_FINAL", "TAG_FLIPS", "TAG_REFIT",
           "ensemble_of", "log_best_model", "log_model", "logged_model", "logged_weights",
           "mlflow_store", "model_from_weights", "prepare_model_logging", "register_uri",
           "score_on_test"]

MODEL_NAME = "model"  # the MLflow model on the search's run: runs:/<search run id>/model
# On a search's run:
TAG_FINAL, TAG_REFIT, TAG_FLIPS = tracking.TAG_FINAL, tracking.TAG_REFIT, tracking.TAG_FLIPS
CHAMPION = "champion"  # the registry alias of the registered version best on its test data
CHECKPOINT = tracking.WEIGHTS  # KerasTuner's per-trial best-epoch weights (Keras 3)


def _silent(line: str) -> None:
    """Where a line goes when the caller gave no `echo`: nowhere (the library prints
    nothing itself)."""


def ensemble_of(models: list, trial_ids: list[str], flips: bool = False):
    """One Keras model whose output is the average of `models`' class probabilities; with
    `flips`, of each member's on the image and on its mirror image (left and right
    swapped: test-time flips, `train.test_time_flips`).

    Same input (`image`, raw pixels) and output (class probabilities) as each member, so
    it serves, exports and logs exactly as a single trial's model does. One model without
    flips: itself. Built of Keras's own layers only, so it loads without `nas`.
    """
    if len(models) == 1 and not flips:
        return models[0]
    import keras

    inputs = keras.Input(models[0].input_shape[1:], name="image")
    for model, trial_id in zip(models, trial_ids):
        model.name = f"trial_{trial_id}"
    views = [inputs, _mirror(inputs)] if flips else [inputs]
    outputs = keras.layers.Average(name="probabilities")(
        [model(view) for model in models for view in views])
    model = keras.Model(inputs, outputs, name="ensemble")
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _mirror(images):
    """`images` (batch, height, width, channels) with left and right swapped, exactly.

    Keras has no layer that flips deterministically (`RandomFlip` flips at random, in
    training only), and a layer of our own would not load where `nas` is not installed:
    so the width axis is moved last and multiplied by the reversed identity matrix (each
    output pixel is one input pixel times 1, plus zeros), then moved back.
    """
    import keras
    import numpy as np

    width = images.shape[2]
    swap = keras.layers.Permute((1, 3, 2), name="mirror_in")
    reverse = keras.layers.Dense(width, use_bias=False, trainable=False, name="mirror")
    back = keras.layers.Permute((1, 3, 2), name="mirror_out")
    mirrored = back(reverse(swap(images)))
    reverse.set_weights([np.eye(width, dtype="float32")[::-1]])
    return mirrored


def log_model(tracker: tracking.Tracker, run_id: str, model, *, trial_id: str,
              trial_run_id: str, register: str | None = None, echo=_silent,
              scores: dict | None = None) -> str:
    """Log `model` on `run_id` as the MLflow model `model`; register it as `register`.

    `scores` (its test scores) become tags of the logged model and of the registered
    version. `echo(line)` is told where the model went.

    Returns the logged model's `models:/<model id>` URI (`runs:/<run_id>/model` loads it too).
    """
    import keras
    import mlflow.tensorflow
    import numpy as np
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, *model.input_shape[1:]), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, model.output_shape[-1]),
                                   "probabilities")]),
    )
    with mlflow_store(tracker.tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.tensorflow.log_model(
            model, name=MODEL_NAME, signature=signature,
            # Explicit: inferring them costs ~10 s of loading the model in a subprocess.
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
            tags={tracking.TAG_TRIAL: trial_id, tracking.TAG_TRIAL_RUN: trial_run_id,
                  **_score_tags(scores)},
        )
    what = (f"trial {trial_id}" if "," not in trial_id
            else f"the ensemble of trials {trial_id.replace(',', ', ')}")
    echo(f"model of {what} logged to MLflow as runs:/{run_id}/{MODEL_NAME}")
    if register:
        echo(f"registered as {register_uri(tracker, info.model_uri, register, scores)}")
    return info.model_uri


def _score_tags(scores: dict | None) -> dict:
    return {tracking.score_tag(name): f"{value:.6g}" if isinstance(value, float) else str(value)
            for name, value in (scores or {}).items()}


_preparing: threading.Thread | None = None


def prepare_model_logging() -> None:
    """Start, once per process, the slow part of logging a model that depends on nothing.

    `mlflow.tensorflow.log_model` checks the pip requirements against the installed
    packages, and MLflow first maps every installed module to its package (~0.6 s, then
    cached). This builds the map in a background thread; `nas search` starts it before
    importing TensorFlow, so the two overlap (an MLflow internal: `nas.mlflowcompat`).
    """
    global _preparing
    if _preparing is None:
        _preparing = threading.Thread(target=mlflowcompat.map_packages,
                                      name="nas-package-map", daemon=True)
        _preparing.start()


def log_best_model(tracker: tracking.Tracker, search_run_id: str, tuner, result,
                   register: str | None = None, echo=_silent, test=None,
                   ensemble: int = 1, refit=None, seed: int = 0, latency=None,
                   max_latency_ms: float | None = None,
                   flips: bool = False) -> tuple[dict, list[str], bool]:
    """At the end of `nas search`: make the final model, score it on the test data, log it.

    The final model is the best trial's at its best epoch or, with `ensemble` K > 1, the
    average of the class probabilities of the best K trials (ranked on validation data,
    like every choice of the search). With `refit` (a dataset of the training and
    validation data), each of its trials is trained again from scratch on it, for the
    epochs its trial needed to reach its best validation score (seeded by `seed`); the
    run's tag `nas.refit` says so. `test` is the held-out data the search never read:
    (batches as `nas.data.test_dataset` makes them, how many samples), or None (no test
    score); the final model is evaluated on it once, and
    `test_loss` and `test_accuracy` are logged on the search's run and as tags of its
    MLflow model (and registered version); the tag `nas.final_trials` names its trials.
    With `latency` (`nas.assembly.latency_meter`), the final model's latency is measured
    and logged on the search's run as well (`latency_ms`, `latency_spread_ms`; an ensemble
    runs every member). With `max_latency_ms`, only trials measured within it are
    members, and a final model measured over it loses its test-time flips first, then
    its last members, until it is within (or one model is left). With `flips`
    (`train.test_time_flips`), the final model averages each member's probabilities on
    the image and its mirror image (`ensemble_of`); the run's tag `nas.test_time_flips`
    says whether it does. A failure here does not fail the search (its trials are
    logged): it is told to `echo` and kept as the run's `nas.model_error` tag. Returns
    the test scores ({} without), the final model's trial ids ([] when it could not be
    made) and whether it flips. `echo(line)` is told what happens.
    """
    members = _of_full_fidelity(result.finished, tuner.oracle)
    if max_latency_ms is not None:
        members = [m for m in members
                   if m.metrics.get("latency_ms", math.inf) <= max_latency_ms]
        if not members:
            message = (f"no finished trial was measured within --max-latency-ms "
                       f"{max_latency_ms:g}")
            tracker.set_tags(search_run_id, {tracking.TAG_MODEL_ERROR: message})
            echo(f"warning: no final model: {message}")
            return {}, [], False
    members = members[:max(1, ensemble)]
    if not members:
        return {}, [], False
    ids = [m.trial_id for m in members]
    try:
        models = []
        for member in members:
            trial = tuner.oracle.trials[member.trial_id]
            if refit is not None:
                echo(f"refitting trial {member.trial_id} on the training and validation data "
                     f"for {trial.best_step + 1} epochs")
                models.append(_refit(tuner.hypermodel, trial, refit, seed))
                continue
            checkpoint = Path(tuner.get_trial_dir(member.trial_id)) / CHECKPOINT
            if not checkpoint.is_file():  # a Ray node's disk, or a lost working folder
                checkpoint = logged_weights(tracker, member.run_id) or checkpoint
            architecture = tuner.hypermodel.architecture(trial.hyperparameters.values).to_dict()
            models.append(model_from_weights(architecture, checkpoint))
        tags = {TAG_FINAL: "", TAG_REFIT: "1" if refit is not None else "0"}
        while True:  # over the latency budget: without flips, then without the last member
            model = ensemble_of(models, ids, flips)
            measured = _latency(model, latency, tags, echo)
            if (max_latency_ms is None or (len(models) == 1 and not flips)
                    or measured.get("latency_ms", 0.0) <= max_latency_ms):
                break
            what = "the final model" if len(models) == 1 else f"the ensemble of {len(models)}"
            if flips:
                echo(f"{what} is over --max-latency-ms {max_latency_ms:g}: without "
                     f"test-time flips")
                flips = False
                continue
            echo(f"{what} is over --max-latency-ms {max_latency_ms:g}: without trial {ids[-1]}")
            models, ids = models[:-1], ids[:-1]
        tags[TAG_FINAL] = ",".join(ids)
        tags[TAG_FLIPS] = "1" if flips else "0"
        scores = {}
        if test is not None:
            scores = score_on_test(model, *test)
        tracker.log_batch(search_run_id, tracker.metrics({**scores, **measured}), tags=tags)
        log_model(tracker, search_run_id, model, trial_id=",".join(ids),
                  trial_run_id=(members[0].run_id or "") if len(ids) == 1 else "",
                  register=register, echo=echo, scores=scores)
        return scores, ids, flips
    except Exception as error:  # the search's results stand without the model
        message = f"{error.__class__.__name__}: {error}".strip().splitlines()[0][:500]
        tracker.set_tags(search_run_id, {tracking.TAG_MODEL_ERROR: message})
        echo(f"warning: the best model was not logged to MLflow ({message})")
        return {}, [], False


def _latency(model, latency, tags: dict, echo) -> dict:
    """The final model's latency metrics (none without `latency`), told to `echo`; why it
    could not be measured goes in `tags` and to `echo`, and the model is logged all the
    same."""
    if latency is None:
        return {}
    try:
        measured = latency(model)
    except Exception as error:
        message = f"{error.__class__.__name__}: {error}".strip().splitlines()[0][:500]
        tags[tracking.TAG_LATENCY_ERROR] = message
        echo(f"warning: the final model's latency could not be measured ({message})")
        return {}
    echo(f"final model latency: {measured.describe()}")
    tags[tracking.TAG_LATENCY] = measured.how
    return measured.metrics()


def _of_full_fidelity(finished: list, oracle) -> list:
    """The finished trials trained on all the training data, best first: a funnel's looks
    (`nas.funnel`) saw a share of it, and are members only when no trial saw it all."""
    full = [row for row in finished if row.trial_id in oracle.trials and funnel.fidelity(
        oracle.trials[row.trial_id].hyperparameters.values)[0] >= 1]
    return full or finished


def _refit(hypermodel, trial, data, seed: int):
    """A trial's candidate trained afresh on `data` for the epochs its best score took, as
    it is served (`Architecture.for_serving`)."""
    import keras

    from nas.models import build_model

    keras.utils.set_random_seed(seed)
    model = hypermodel.build(trial.hyperparameters)
    hypermodel.fit(trial.hyperparameters, model, data, epochs=trial.best_step + 1, verbose=0,
                   shuffle=False)  # `data` shuffles itself
    architecture = hypermodel.architecture(trial.hyperparameters.values).for_serving()
    served = build_model(architecture, jit_compile=False)
    served.set_weights(model.get_weights())
    return served


def score_on_test(model, test, samples: int) -> dict:
    """`model` evaluated once on the held-out batches `test` (`samples` images):
    test_loss, test_accuracy, test_samples.

    Every objective (accuracy or loss, on validation or training data) has its test
    counterpart among them.
    """
    scores = model.evaluate(test, verbose=0, return_dict=True)
    return {"test_loss": float(scores["loss"]), "test_accuracy": float(scores["accuracy"]),
            "test_samples": samples}


_DOWNLOADS: list = []  # folders of weights downloaded from MLflow, removed at exit


def logged_weights(tracker: tracking.Tracker, run_id: str | None) -> Path | None:
    """The weights logged to the trial run `run_id`, downloaded; None if it has none."""
    if not run_id:
        return None
    try:
        if tracking.WEIGHTS not in tracker.list_artifacts(run_id):
            return None
        folder = tempfile.TemporaryDirectory(prefix="nas-weights-")
        _DOWNLOADS.append(folder)
        return Path(tracker.download_artifact(run_id, tracking.WEIGHTS, folder.name))
    except Exception:  # the run or its artifacts are gone: no weights from there
        return None


def model_from_weights(architecture: dict, checkpoint: Path):
    """Rebuild the trial's model from its `Architecture.to_dict()` and load its weights."""
    from nas.architecture import Architecture
    from nas.models import build_model

    # Served in float32 whatever the search trained with; the weights are float32 anyway.
    model = build_model(Architecture.from_dict(architecture).for_serving(), jit_compile=False)
    with no_optimizer_warning():
        model.load_weights(str(checkpoint))
    return model


@contextlib.contextmanager
def no_optimizer_warning():
    # Saved weights also hold the optimizer's state, which serving does not need.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        yield


def logged_model(tracker: tracking.Tracker, search: results.Search):
    """The MLflow model `nas search` logged on the search's run, or None."""
    models = tracker.logged_models(search.experiment_id, MODEL_NAME)
    return next((m for m in models if m.source_run_id == search.run_id), None)


def register_uri(tracker: tracking.Tracker, model_uri: str, name: str,
                  scores: dict | None = None) -> str:
    import mlflow

    with mlflow_store(tracker.tracking_uri), _quiet_mlflow():
        version = mlflow.register_model(model_uri, name, tags=_score_tags(scores) or None)
    shown = f"{name} version {version.version}"
    if scores and "test_accuracy" in scores and _beats_champion(tracker, name, scores):
        tracker.set_model_alias(name, CHAMPION, version.version)
        shown += f" (alias {CHAMPION}: models:/{name}@{CHAMPION})"
    return shown


def _beats_champion(tracker: tracking.Tracker, name: str, scores: dict) -> bool:
    """Whether a version scoring `scores` on its test data should be the champion: there
    is none, or the champion's held-out test accuracy is not higher."""
    champion = tracker.model_version_by_alias(name, CHAMPION)
    if champion is None:  # no champion yet
        return True
    try:
        return scores["test_accuracy"] >= float(
            champion.tags.get(tracking.score_tag("test_accuracy"), "-inf"))
    except ValueError:
        return True


@contextlib.contextmanager
def mlflow_store(tracking_uri: str):
    """MLflow's fluent API (log_model, register_model) on `tracking_uri`, restored after.

    `mlflow.set_tracking_uri(None)` also clears MLFLOW_TRACKING_URI, so the variable is
    put back by hand.
    """
    import mlflow

    saved_uri = mlflowcompat.set_tracking_uri()
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextlib.contextmanager
def _quiet_mlflow():
    # register_model prints "Successfully registered ..." and "Created version ...": the
    # caller says it once.
    import io
    import logging

    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)
