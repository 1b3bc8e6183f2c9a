"""The best trial -> a TensorFlow SavedModel (or TFLite), and the MLflow model of a search.

The exported model takes images as the pipeline reads them (raw float32 pixel values at
the pipeline's input shape; the Rescaling layer is inside) and returns class
probabilities. Its weights are the trial's best epoch, taken from KerasTuner's
checkpoint when this machine holds the search's working folder, else from the MLflow
model `nas search` logged on the search's run (`runs:/<search run>/model`), so an export
works anywhere the tracking store is reachable.

TensorFlow is imported inside the functions: the CLI imports this module cheaply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

from nas import results, tracking
from nas.search import STATE_FILE, project_folder

__all__ = ["prepare_model_logging", "ExportError", "Exported", "FORMATS", "MODEL_NAME", "export", "log_model",
           "log_best_model", "score_on_test", "load_trial_model", "load_model", "ensemble_of",
           "final_trials", "logged_model", "TAG_FINAL"]

FORMATS = ("savedmodel", "tflite")
MODEL_NAME = "model"  # the MLflow model on the search's run: runs:/<search run id>/model
TAG_FINAL, TAG_REFIT = tracking.TAG_FINAL, tracking.TAG_REFIT  # on a search's run
CHAMPION = "champion"  # the registry alias of the registered version best on its test data
CLASS_NAMES_FILE = "class_names.json"
_CHECKPOINT = tracking.WEIGHTS  # KerasTuner's per-trial best-epoch weights (Keras 3)


class ExportError(ValueError):
    """The export cannot be done as asked; nothing was written."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `export` wrote and where its weights came from."""

    out: Path
    format: str
    search: results.Search
    trial: results.TrialRow  # the best of `members`
    source: str  # "the KerasTuner checkpoint <path>" or "the MLflow model <uri>"
    registered: str | None = None  # "NAME version N"
    members: tuple[results.TrialRow, ...] = ()  # the trials averaged (one: a single model)
    is_final: bool = False  # the search's final model, the one scored on the test data


def export(tracker: tracking.Tracker, out: str | os.PathLike, *, experiment: str | None = None,
           run_id: str | None = None, workdir: str | os.PathLike = ".nas", force: bool = False,
           format: str = "savedmodel", register: str | None = None,
           trial_id: str | None = None, ensemble: int | None = None) -> Exported:
    """Export a search's final model (or one trial's, or an ensemble of its best) into `out`.

    Without `run_id`, the latest search of `experiment` (default: the experiment searched
    last). A search's run, or no run, exports the search's final model (the ensemble of
    its best trials that `nas search --ensemble` made, or its best trial); `ensemble` K
    instead averages its best K trials (1: the best trial alone); a trial's run, or
    `trial_id`, that trial. `out` receives a SavedModel (`saved_model.pb`, `variables/`;
    signature `serving_default`) or `model.tflite`, and `class_names.json` beside it. The
    model is built in a temporary folder and moved into place, so a failure leaves `out`
    as it was.

    Raises:
        ExportError: `out` is not empty and not `force`, bad `format`, no such trial, no
            weights found.
        nas.results.ResultsError: no such experiment or run, or no finished trial.
    """
    if format not in FORMATS:
        raise ExportError(f"--format: {format!r} is not one of {list(FORMATS)}")
    if ensemble is not None and ensemble < 1:
        raise ExportError(f"--ensemble: {ensemble} must be at least 1")
    out = Path(out)
    _check_out(out, force)
    if run_id is not None:
        search, trial = results.find_run(tracker, run_id)
    else:
        search, trial = results.find_search(tracker, experiment), None
    rows = results.list_trials(tracker, search)
    if trial_id is not None:
        trial = next((r for r in rows if r.trial_id == trial_id), None)
        if trial is None:
            raise ExportError(f"--trial: experiment {search.experiment_name!r} has no trial "
                              f"{trial_id!r} (see nas trials)")
    if trial is not None and trial.status != "FINISHED":
        flag = "--trial" if trial_id is not None else "--run"
        raise ExportError(f"{flag}: trial {trial.trial_id} ({trial.run_id}) is {trial.status}, "
                          f"not FINISHED; it has no trained model to export")
    members = [trial] if trial is not None else _members(search, rows, ensemble)
    # After --refit the final model is the retrained one; trials asked for by name or
    # count are exported as the search trained them.
    asked = trial is not None or ensemble is not None
    final = (final_trials(search) == [m.trial_id for m in members]
             and not (asked and search.tags.get(TAG_REFIT) == "1"))
    classes = _read_json(tracker, search.run_id, "classes.json")
    model, source = load_model(tracker, search, members, workdir, final=final)
    exported = Exported(out, format, search, members[0], source, None, tuple(members), final)

    with tempfile.TemporaryDirectory(prefix="nas-export-") as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        if format == "savedmodel":
            model.export(str(staged), format="tf_saved_model", verbose=False)
        else:
            model.export(str(staged / "model.tflite"), format="litert", verbose=False)
        (staged / CLASS_NAMES_FILE).write_text(json.dumps({
            "class_names": classes.get("class_names", []),
            "input_shape": list(model.input_shape[1:]),
            "pixel_scale": classes.get("pixel_scale"),
            "experiment": search.experiment_name,
            "search_run_id": search.run_id,
            "trial_id": members[0].trial_id if len(members) == 1 else None,
            "trial_run_id": members[0].run_id if len(members) == 1 else None,
            "ensemble": [m.trial_id for m in members],  # their probabilities, averaged
            "objective": {"name": search.objective,
                          "value": [m.objective for m in members] if len(members) > 1
                          else members[0].objective},
            # Held-out scores, measured once by `nas search`, of its final model only.
            "test": search.test if final else {},
            "refit": final and search.tags.get(TAG_REFIT) == "1",  # retrained on train + val
        }, indent=2) + "\n")
        _move_into_place(staged, out)

    if register:
        from mlflow.exceptions import MlflowException

        try:
            registered = _register(tracker, search, members, model, register,
                                   search.test if final else None, final)
        except MlflowException as error:
            first = (str(error).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"--register: {out} was written, but the model was not "
                              f"registered as {register!r}: {first}") from None
        exported = dataclasses.replace(exported, registered=registered)
    return exported


def final_trials(search: results.Search) -> list[str]:
    """The trial ids of a search's final model (one, or the members of its ensemble)."""
    return search.final_trials


def _members(search: results.Search, rows, ensemble: int | None) -> list[results.TrialRow]:
    """The trials a search-level export averages: its final model's, or the best K."""
    if ensemble is None:
        by_id = {r.trial_id: r for r in rows if r.status == "FINISHED"}
        final = [by_id.get(t) for t in final_trials(search)]
        if final and None not in final:
            return final
        ensemble = 1
    best = results.best_trial(rows, search)  # raises when nothing finished
    ranked = results.sort_trials([r for r in rows if r.status == "FINISHED"
                                  and r.objective is not None], "objective", search)
    return [best] + [r for r in ranked if r.trial_id != best.trial_id][:ensemble - 1]


def load_model(tracker: tracking.Tracker, search: results.Search,
               members: list[results.TrialRow], workdir: str | os.PathLike = ".nas",
               final: bool = False):
    """The model averaging `members` (one: that trial's model), and where it came from.

    `final`: `members` are the search's final model. One that `nas search --refit`
    retrained exists only as the search's MLflow model (its trials' checkpoints hold
    their weights as the search trained them).

    Raises:
        ExportError: neither KerasTuner's checkpoints nor a matching MLflow model is found.
    """
    ids = ",".join(m.trial_id for m in members)
    if final and search.tags.get(TAG_REFIT) == "1":
        found = _from_logged_model(tracker, search, ids)
        if found is None:
            raise ExportError(
                f"experiment {search.experiment_name!r}: the final model (retrained by "
                f"--refit) was not logged to MLflow on run {search.run_id}; --trial ID or "
                f"--ensemble K export the trials as the search trained them")
        return found
    if len(members) == 1:
        return load_trial_model(tracker, search, members[0], workdir)
    checkpoints = [_checkpoint(search, m, workdir) for m in members]
    if None not in checkpoints:
        return (_ensemble_from(tracker, members, checkpoints),
                f"the KerasTuner checkpoints in {checkpoints[0].parent.parent}")
    found = (None if search.tags.get(TAG_REFIT) == "1"  # the logged model is the refit one
             else _from_logged_model(tracker, search, ids))
    if found is not None:
        return found
    logged = [_logged_weights(tracker, m.run_id) for m in members]
    if None not in logged:
        return (_ensemble_from(tracker, members, logged),
                f"the weights logged to the trials' MLflow runs ({tracking.WEIGHTS})")
    raise ExportError(
        f"experiment {search.experiment_name!r}: no weights found for the ensemble of trials "
        f"{ids}; neither KerasTuner's checkpoints (see --workdir) nor an MLflow model of "
        f"these trials on run {search.run_id}"
    )


def _ensemble_from(tracker: tracking.Tracker, members, weights: list[Path]):
    models = [_model_from_checkpoint(_read_json(tracker, m.run_id, "architecture.json"), w)
              for m, w in zip(members, weights)]
    return ensemble_of(models, [m.trial_id for m in members])


def _from_logged_model(tracker: tracking.Tracker, search: results.Search, trial_ids: str):
    """The search's MLflow model and where it came from, if it holds `trial_ids` (comma-
    separated); else None."""
    logged = logged_model(tracker, search)
    if logged is None or logged.tags.get(tracking.TAG_TRIAL) != trial_ids:
        return None
    import mlflow.tensorflow

    with _store(tracker.tracking_uri), _no_optimizer_warning():
        model = mlflow.tensorflow.load_model(f"models:/{logged.model_id}")
    return model, f"the MLflow model runs:/{search.run_id}/{MODEL_NAME}"


def ensemble_of(models: list, trial_ids: list[str]):
    """One Keras model whose output is the average of `models`' class probabilities.

    Same input (`image`, raw pixels) and output (class probabilities) as each member, so
    it serves, exports and logs exactly as a single trial's model does. One model: itself.
    """
    if len(models) == 1:
        return models[0]
    import keras

    inputs = keras.Input(models[0].input_shape[1:], name="image")
    for model, trial_id in zip(models, trial_ids):
        model.name = f"trial_{trial_id}"
    outputs = keras.layers.Average(name="probabilities")([m(inputs) for m in models])
    model = keras.Model(inputs, outputs, name="ensemble")
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def load_trial_model(tracker: tracking.Tracker, search: results.Search,
                     trial: results.TrialRow, workdir: str | os.PathLike = ".nas"):
    """The trained Keras model of `trial` at its best epoch, and where it came from.

    Raises:
        ExportError: neither the KerasTuner checkpoint nor an MLflow model is found.
    """
    checkpoint = _checkpoint(search, trial, workdir)
    if checkpoint is not None:
        architecture = _read_json(tracker, trial.run_id, "architecture.json")
        return (_model_from_checkpoint(architecture, checkpoint),
                f"the KerasTuner checkpoint {checkpoint}")
    found = (None if search.tags.get(TAG_REFIT) == "1"  # the logged model is the refit one
             else _from_logged_model(tracker, search, trial.trial_id))
    if found is not None:
        return found
    logged = _logged_weights(tracker, trial.run_id)
    if logged is not None:
        architecture = _read_json(tracker, trial.run_id, "architecture.json")
        return (_model_from_checkpoint(architecture, logged),
                f"the weights logged to its MLflow run runs:/{trial.run_id}/{tracking.WEIGHTS}")
    where = (Path(workdir) / project_folder(search.experiment_name) / f"trial_{trial.trial_id}"
             / _CHECKPOINT)
    raise ExportError(
        f"trial {trial.trial_id} of experiment {search.experiment_name!r}: no weights found; "
        f"neither the KerasTuner checkpoint {where} (see --workdir) nor an MLflow model of "
        f"this trial on run {search.run_id}"
    )


def log_model(tracker: tracking.Tracker, run_id: str, model, *, trial_id: str,
              trial_run_id: str, register: str | None = None, echo=print,
              scores: dict | None = None) -> str:
    """Log `model` on `run_id` as the MLflow model `model`; register it as `register`.

    `scores` (its test scores) become tags of the logged model and of the registered
    version.

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
    with _store(tracker.tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.tensorflow.log_model(
            model, name=MODEL_NAME, signature=signature,
            # Explicit: inferring them costs ~10 s of loading the model in a subprocess.
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
            tags={tracking.TAG_TRIAL: trial_id, "nas.trial_run_id": trial_run_id,
                  **_score_tags(scores)},
        )
    what = (f"trial {trial_id}" if "," not in trial_id
            else f"the ensemble of trials {trial_id.replace(',', ', ')}")
    echo(f"model of {what} logged to MLflow as runs:/{run_id}/{MODEL_NAME}")
    if register:
        echo(f"registered as {_register_uri(tracker, info.model_uri, register, scores)}")
    return info.model_uri


def _score_tags(scores: dict | None) -> dict:
    return {f"nas.{name}": f"{value:.6g}" if isinstance(value, float) else str(value)
            for name, value in (scores or {}).items()}


_preparing: threading.Thread | None = None


def prepare_model_logging() -> None:
    """Start, once per process, the slow part of logging a model that depends on nothing.

    `mlflow.tensorflow.log_model` checks the pip requirements against the installed
    packages, and MLflow first maps every installed module to its package (~0.6 s, then
    cached). This builds the map in a background thread; `nas search` starts it before
    importing TensorFlow, so the two overlap. (An MLflow internal: if it moves, the map
    is simply built when the model is logged.)
    """
    global _preparing
    if _preparing is None:
        _preparing = threading.Thread(target=_map_packages, name="nas-package-map",
                                      daemon=True)
        _preparing.start()


def _map_packages() -> None:
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()
    except Exception:  # only a head start; logging the model builds it anyway
        pass


def log_best_model(tracker: tracking.Tracker, search_run_id: str, tuner, result,
                   register: str | None = None, echo=print, test=None,
                   ensemble: int = 1, refit=None,
                   seed: int = 0) -> dict:
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
    A failure here does not fail the search (its trials are logged): it is printed and
    kept as the run's `nas.model_error` tag. Returns the test scores ({} without) and the
    final model's trial ids ([] when it could not be made).
    """
    members = result.finished[:max(1, ensemble)]
    if not members:
        return {}, []
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
            checkpoint = Path(tuner.get_trial_dir(member.trial_id)) / _CHECKPOINT
            if not checkpoint.is_file():  # a worker's disk, or a lost working folder
                checkpoint = _logged_weights(tracker, member.run_id) or checkpoint
            architecture = tuner.hypermodel.architecture(trial.hyperparameters.values).to_dict()
            models.append(_model_from_checkpoint(architecture, checkpoint))
        model = ensemble_of(models, ids)
        scores = {}
        if test is not None:
            scores = score_on_test(model, *test)
        tags = {TAG_FINAL: ",".join(ids), TAG_REFIT: "1" if refit is not None else "0"}
        tracker.log_batch(search_run_id, tracker.metrics(scores), tags=tags)
        log_model(tracker, search_run_id, model, trial_id=",".join(ids),
                  trial_run_id=(members[0].run_id or "") if len(ids) == 1 else "",
                  register=register, echo=echo, scores=scores)
        return scores, ids
    except Exception as error:  # the search's results stand without the model
        message = f"{error.__class__.__name__}: {error}".strip().splitlines()[0][:500]
        tracker.set_tags(search_run_id, {"nas.model_error": message})
        echo(f"warning: the best model was not logged to MLflow ({message})")
        return {}, []


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


# --- the pieces ---------------------------------------------------------------------------


_EXPORT_MARKERS = ("class_names.json", "saved_model.pb", "model.tflite")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out: {out} is not empty; pass --force to replace its "
                              f"content")
        # --force replaces an earlier export, never a folder of other files.
        if not any((out / name).exists() for name in _EXPORT_MARKERS):
            raise ExportError(f"--out: {out} holds files that are not a nas export; --force "
                              f"only replaces an earlier export, choose a folder of its own")


def _move_into_place(staged: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    shutil.move(str(staged), str(out))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoint(search: results.Search, trial: results.TrialRow, workdir) -> Path | None:
    """KerasTuner's checkpoint of `trial`, if this workdir holds this very search."""
    project = Path(workdir) / project_folder(search.experiment_name)
    checkpoint = project / f"trial_{trial.trial_id}" / _CHECKPOINT
    try:
        state = json.loads((project / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    # The same experiment name in another tracking store is another search.
    if state.get("search_run_id") != search.run_id or not checkpoint.is_file():
        return None
    return checkpoint


_DOWNLOADS: list = []  # folders of weights downloaded from MLflow, removed at exit


def _logged_weights(tracker: tracking.Tracker, run_id: str | None) -> Path | None:
    """The weights logged to the trial run `run_id`, downloaded; None if it has none."""
    if not run_id:
        return None
    try:
        if not any(a.path == tracking.WEIGHTS for a in tracker.client.list_artifacts(run_id)):
            return None
        folder = tempfile.TemporaryDirectory(prefix="nas-weights-")
        _DOWNLOADS.append(folder)
        return Path(tracker.client.download_artifacts(run_id, tracking.WEIGHTS, folder.name))
    except Exception:  # the run or its artifacts are gone: no weights from there
        return None


def _model_from_checkpoint(architecture: dict, checkpoint: Path):
    """Rebuild the trial's model from its `Architecture.to_dict()` and load its weights."""
    from nas.architecture import Architecture
    from nas.models import build_model

    # Served in float32 whatever the search trained with; the weights are float32 anyway.
    model = build_model(Architecture.from_dict(architecture).for_serving(), jit_compile=False)
    with _no_optimizer_warning():
        model.load_weights(str(checkpoint))
    return model


@contextlib.contextmanager
def _no_optimizer_warning():
    # Saved weights also hold the optimizer's state, which serving does not need.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        yield


def logged_model(tracker: tracking.Tracker, search: results.Search):
    """The MLflow model `nas search` logged on the search's run, or None."""
    models = tracker.client.search_logged_models(
        experiment_ids=[search.experiment_id], filter_string=f"name = '{MODEL_NAME}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
    )
    return next((m for m in models if m.source_run_id == search.run_id), None)


def _register(tracker, search, members, model, name: str, scores: dict | None,
              final: bool) -> str:
    ids = ",".join(m.trial_id for m in members)
    logged = logged_model(tracker, search)
    refit = search.tags.get(TAG_REFIT) == "1"
    if logged is not None and logged.tags.get(tracking.TAG_TRIAL) == ids and (
            final or not refit):  # after --refit the logged model is the retrained one
        return _register_uri(tracker, f"models:/{logged.model_id}", name, scores)
    # Not the search's logged model (another trial, or none was logged): log it on the
    # trial's own run (an ensemble: the search's) first, so that the registry points at
    # a model MLflow holds.
    run_id = members[0].run_id if len(members) == 1 else search.run_id
    model_uri = log_model(tracker, run_id, model, trial_id=ids,
                          trial_run_id=members[0].run_id if len(members) == 1 else "",
                          echo=lambda line: None, scores=scores)
    return _register_uri(tracker, model_uri, name, scores)


def _register_uri(tracker: tracking.Tracker, model_uri: str, name: str,
                  scores: dict | None = None) -> str:
    import mlflow

    with _store(tracker.tracking_uri), _quiet_mlflow():
        version = mlflow.register_model(model_uri, name, tags=_score_tags(scores) or None)
    shown = f"{name} version {version.version}"
    if scores and "test_accuracy" in scores and _beats_champion(tracker, name, scores):
        tracker.client.set_registered_model_alias(name, CHAMPION, version.version)
        shown += f" (alias {CHAMPION}: models:/{name}@{CHAMPION})"
    return shown


def _beats_champion(tracker: tracking.Tracker, name: str, scores: dict) -> bool:
    """Whether a version scoring `scores` on its test data should be the champion: there
    is none, or the champion's held-out test accuracy is not higher."""
    from mlflow.exceptions import MlflowException

    try:
        champion = tracker.client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        return True
    try:
        return scores["test_accuracy"] >= float(champion.tags.get("nas.test_accuracy", "-inf"))
    except ValueError:
        return True


def _read_json(tracker: tracking.Tracker, run_id: str, artifact: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.client.download_artifacts(run_id, artifact, tmp)
        except Exception:
            raise ExportError(f"run {run_id} has no {artifact} artifact (was it written by "
                              f"nas search?)") from None
        return json.loads(Path(path).read_text())


@contextlib.contextmanager
def _store(tracking_uri: str):
    """MLflow's fluent API (log_model, register_model) on `tracking_uri`, restored after.

    `mlflow.set_tracking_uri(None)` also clears MLFLOW_TRACKING_URI, so the variable is
    put back by hand.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
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
