"""`nas export`: a search's final model, a trial or an ensemble -> a SavedModel (or TFLite).

The exported model takes images as the pipeline reads them (raw float32 pixel values at
the pipeline's input shape; the Rescaling layer is inside) and returns class
probabilities. Its weights are the trial's best epoch, taken from KerasTuner's
checkpoint when this machine holds the search's working folder, else from the MLflow
model `nas search` logged on the search's run (`runs:/<search run>/model`), so an export
works anywhere the tracking store is reachable.

TensorFlow is imported inside the functions: the CLI imports this module cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from nas import final_model, results, resume, tracking
from nas.errors import InputError
from nas.settings import project_folder

__all__ = ["ExportError", "Exported", "FORMATS", "CLASS_NAMES_FILE", "export", "load_model",
           "load_trial_model"]

FORMATS = ("savedmodel", "tflite")
CLASS_NAMES_FILE = "class_names.json"


class ExportError(InputError):
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
        raise ExportError(f"`format`: {format!r} is not one of {list(FORMATS)}")
    if ensemble is not None and ensemble < 1:
        raise ExportError(f"`ensemble`: {ensemble} must be at least 1")
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
            raise ExportError(f"`trial`: experiment {search.experiment_name!r} has no trial "
                              f"{trial_id!r} (see nas trials)")
    if trial is not None and trial.status != "FINISHED":
        flag = "`trial`" if trial_id is not None else "`run`"
        raise ExportError(f"{flag}: trial {trial.trial_id} ({trial.run_id}) is {trial.status}, "
                          f"not FINISHED; it has no trained model to export")
    members = [trial] if trial is not None else _members(search, rows, ensemble)
    # After --refit the final model is the retrained one; trials asked for by name or
    # count are exported as the search trained them (without test-time flips too).
    asked = trial is not None or ensemble is not None
    final = (search.final_trials == [m.trial_id for m in members]
             and not (asked and (search.refit or search.flips)))
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
            "refit": final and search.refit,  # retrained on training + validation data
            "test_time_flips": final and search.flips,  # averaged with each mirror image
        }, indent=2) + "\n")
        _move_into_place(staged, out)

    if register:
        from mlflow.exceptions import MlflowException

        try:
            registered = _register(tracker, search, members, model, register,
                                   search.test if final else None, final)
        except MlflowException as error:
            first = (str(error).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"`register`: {out} was written, but the model was not "
                              f"registered as {register!r}: {first}") from None
        exported = dataclasses.replace(exported, registered=registered)
    return exported


def _members(search: results.Search, rows, ensemble: int | None) -> list[results.TrialRow]:
    """The trials a search-level export averages: its final model's, or the best K."""
    if ensemble is None:
        by_id = {r.trial_id: r for r in rows if r.status == "FINISHED"}
        final = [by_id.get(t) for t in search.final_trials]
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
    their weights as the search trained them); one with test-time flips
    (`train.test_time_flips`) averages each member's probabilities on the image and its
    mirror image, as the search made it.

    Raises:
        ExportError: neither KerasTuner's checkpoints nor a matching MLflow model is found.
    """
    ids = ",".join(m.trial_id for m in members)
    flips = final and search.flips  # the search's final model sees mirror images too
    if final and search.refit:
        found = _from_logged_model(tracker, search, ids)
        if found is None:
            raise ExportError(
                f"experiment {search.experiment_name!r}: the final model (retrained by "
                f"`nas search --refit`) was not logged to MLflow on run {search.run_id}; "
                f"`trial` ID or `ensemble` K export the trials as the search trained them")
        return found
    if len(members) == 1 and not flips:
        return load_trial_model(tracker, search, members[0], workdir)
    checkpoints = [_checkpoint(search, m, workdir) for m in members]
    if None not in checkpoints:
        return (_ensemble_from(tracker, members, checkpoints, flips),
                f"the KerasTuner checkpoints in {checkpoints[0].parent.parent}")
    found = (None if search.refit  # the logged model is the refit one
             else _from_logged_model(tracker, search, ids))
    if found is not None:
        return found
    logged = [final_model.logged_weights(tracker, m.run_id) for m in members]
    if None not in logged:
        return (_ensemble_from(tracker, members, logged, flips),
                f"the weights logged to the trials' MLflow runs ({tracking.WEIGHTS})")
    raise ExportError(
        f"experiment {search.experiment_name!r}: no weights found for the ensemble of trials "
        f"{ids}; neither KerasTuner's checkpoints (see `workdir`) nor an MLflow model of "
        f"these trials on run {search.run_id}"
    )


def _ensemble_from(tracker: tracking.Tracker, members, weights: list[Path], flips: bool = False):
    models = [final_model.model_from_weights(_read_json(tracker, m.run_id, "architecture.json"), w)
              for m, w in zip(members, weights)]
    return final_model.ensemble_of(models, [m.trial_id for m in members], flips)


def _from_logged_model(tracker: tracking.Tracker, search: results.Search, trial_ids: str):
    """The search's MLflow model and where it came from, if it holds `trial_ids` (comma-
    separated); else None."""
    logged = final_model.logged_model(tracker, search)
    if logged is None or logged.tags.get(tracking.TAG_TRIAL) != trial_ids:
        return None
    import mlflow.tensorflow

    with final_model.mlflow_store(tracker.tracking_uri), final_model.no_optimizer_warning():
        model = mlflow.tensorflow.load_model(f"models:/{logged.model_id}")
    return model, f"the MLflow model runs:/{search.run_id}/{final_model.MODEL_NAME}"


def load_trial_model(tracker: tracking.Tracker, search: results.Search,
                     trial: results.TrialRow, workdir: str | os.PathLike = ".nas"):
    """The trained Keras model of `trial` at its best epoch, and where it came from.

    Raises:
        ExportError: neither the KerasTuner checkpoint nor an MLflow model is found.
    """
    checkpoint = _checkpoint(search, trial, workdir)
    if checkpoint is not None:
        architecture = _read_json(tracker, trial.run_id, "architecture.json")
        return (final_model.model_from_weights(architecture, checkpoint),
                f"the KerasTuner checkpoint {checkpoint}")
    found = (None if search.refit  # the logged model is the refit one
             else _from_logged_model(tracker, search, trial.trial_id))
    if found is not None:
        return found
    logged = final_model.logged_weights(tracker, trial.run_id)
    if logged is not None:
        architecture = _read_json(tracker, trial.run_id, "architecture.json")
        return (final_model.model_from_weights(architecture, logged),
                f"the weights logged to its MLflow run runs:/{trial.run_id}/{tracking.WEIGHTS}")
    where = (Path(workdir) / project_folder(search.experiment_name) / f"trial_{trial.trial_id}"
             / final_model.CHECKPOINT)
    raise ExportError(
        f"trial {trial.trial_id} of experiment {search.experiment_name!r}: no weights found; "
        f"neither the KerasTuner checkpoint {where} (see `workdir`) nor an MLflow model of "
        f"this trial on run {search.run_id}"
    )


# --- the pieces ---------------------------------------------------------------------------


_EXPORT_MARKERS = ("class_names.json", "saved_model.pb", "model.tflite")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"`out`: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"`out`: {out} is not empty; pass `force` to replace its "
                              f"content")
        # `force` replaces an earlier export, never a folder of other files.
        if not any((out / name).exists() for name in _EXPORT_MARKERS):
            raise ExportError(f"`out`: {out} holds files that are not a nas export; `force` "
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
    checkpoint = project / f"trial_{trial.trial_id}" / final_model.CHECKPOINT
    state = resume.read_state(project)
    # The same experiment name in another tracking store is another search.
    if state is None or state.search_run_id != search.run_id or not checkpoint.is_file():
        return None
    return checkpoint


def _register(tracker, search, members, model, name: str, scores: dict | None,
              final: bool) -> str:
    ids = ",".join(m.trial_id for m in members)
    logged = final_model.logged_model(tracker, search)
    refit = search.refit
    if logged is not None and logged.tags.get(tracking.TAG_TRIAL) == ids and (
            final or not refit):  # after --refit the logged model is the retrained one
        return final_model.register_uri(tracker, f"models:/{logged.model_id}", name, scores)
    # Not the search's logged model (another trial, or none was logged): log it on the
    # trial's own run (an ensemble: the search's) first, so that the registry points at
    # a model MLflow holds.
    run_id = members[0].run_id if len(members) == 1 else search.run_id
    model_uri = final_model.log_model(tracker, run_id, model, trial_id=ids,
                                      trial_run_id=members[0].run_id if len(members) == 1
                                      else "", scores=scores)
    return final_model.register_uri(tracker, model_uri, name, scores)


def _read_json(tracker: tracking.Tracker, run_id: str, artifact: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.download_artifact(run_id, artifact, tmp)
        except Exception:
            raise ExportError(f"run {run_id} has no {artifact} artifact (was it written by "
                              f"nas search?)") from None
        return json.loads(Path(path).read_text())


