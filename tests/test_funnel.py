"""Cheap looks before expensive ones (issue 22): the funnel's plan, the share a look trains
on, weights a child inherits, a schedule that fits the time, a whole funnel and its resume."""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas import data, funnel, tuning
from nas.cli import main
from nas.events import Callback
from nas.funnel import Funnel, Step, Trained
from nas.search import SearchConfig, prepare, run
from nas.specs import load_pipeline, load_space


def look(trial_id, score, seconds=10.0, flops=1000):
    return Trained(trial_id, funnel.LOOK_SHARE, funnel.LOOK_EPOCHS, score, seconds, flops)


def full(trial_id, parent, score=0.9, epochs=10, seconds=100.0, flops=1000):
    return Trained(trial_id, 1.0, epochs, score, seconds, flops, parent)


# --- the plan ---------------------------------------------------------------------------


def test_the_funnel_looks_first_then_trains_the_best_looks_on_all_the_data_in_the_time_left():
    plan = Funnel(limit=1000, train_samples=10_000, validation_samples=3_000, finalists=3,
                  direction="max")
    assert plan.reserve == 30  # 3% of the limit, for the final model
    assert plan.next(0, []) == Step("look", funnel.LOOK_SHARE, funnel.LOOK_EPOCHS)
    looks = [look("0", 0.80, 4), look("1", 0.86, 4), look("2", 0.83, 4), look("3", None)]
    assert plan.next(100, looks).kind == "look"  # inside the looks' part of the limit

    step = plan.next(400, looks)  # past it: the best look, on all the data, from its weights
    assert step.kind == "full" and step.share == 1.0 and step.parent == "1"
    # A look of 1000 FLOPs took 4 s for 3 epochs on 2,000 training images and 1,000 of
    # validation (a third each); a full epoch is 11,000,000 units: 4.4 s.
    per_epoch = 4 / (3 * 1000 * (2_000 + 1_000)) * 1000 * (10_000 + 1_000)
    left = 1000 - 30 - 400
    assert 3 * funnel.ENSEMBLE_EPOCHS * per_epoch <= left  # room for three finalists
    assert step.epochs == int(left / 3 // per_epoch)

    # the next goes to the next best look, never to one promoted or being trained elsewhere
    assert plan.next(600, looks + [full("4", "1")]).parent == "2"
    assert plan.next(600, looks, running=("1",)).parent == "2"
    # with every finalist trained, what is left goes to looks, then nothing fits
    done = looks + [full("4", "1"), full("5", "2"), full("6", "0")]
    assert plan.next(900, done).kind == "look"
    assert plan.next(975, done) is None
    # looks without a measured time (a state rebuilt from MLflow): another look measures one
    assert plan.next(400, [look("0", 0.8, seconds=0.0)]).kind == "look"


def test_the_funnel_trains_fewer_finalists_when_the_time_left_holds_fewer():
    plan = Funnel(limit=1000, train_samples=10_000, validation_samples=3_000, finalists=3,
                  direction="min")
    looks = [look("0", 0.5, seconds=60), look("1", 0.3, seconds=60)]  # loss: lower is better
    step = plan.next(400, looks)  # an epoch on all the data now takes 20 s x 11/3
    assert step.parent == "1" and step.epochs == int((1000 - 30 - 400) // (20 * 11 / 3))
    # the time left for two at `ENSEMBLE_EPOCHS` each, not three: two, each half of it
    quick = [look("0", 0.5, seconds=9), look("1", 0.3, seconds=9)]  # 11 s an epoch
    assert 2 * funnel.ENSEMBLE_EPOCHS * 11 <= 1000 - 30 - 400 < 3 * funnel.ENSEMBLE_EPOCHS * 11
    assert plan.next(400, quick).epochs == int((1000 - 30 - 400) / 2 // 11)
    # too little time even for one full training at its minimum epochs: still one, shorter
    assert plan.next(850, looks).epochs == 1
    # once one full training exists, another must get its minimum, or looks fill the time
    assert plan.next(850, looks + [full("2", "1")]).kind == "look"


def test_with_refit_the_funnel_holds_back_the_time_its_refits_will_take():
    plain = Funnel(limit=1000, train_samples=10_000, validation_samples=2_500, finalists=1,
                   direction="max")
    refit = Funnel(limit=1000, train_samples=10_000, validation_samples=2_500, finalists=1,
                   direction="max", refit=True)
    assert refit.refit_cost == 1.25  # a refit trains on training + validation data
    looks = [look("0", 0.8), look("1", 0.7)]
    epochs = plain.next(400, looks).epochs
    assert refit.next(400, looks).epochs == int(refit.full_seconds(570) // (
        plain.epoch_seconds(1000, 1.0, looks, own=looks[0])))
    assert refit.next(400, looks).epochs < epochs * 0.5
    trained = looks + [full("2", "0", seconds=200.0)]
    assert refit.left(700, trained) == 1000 - 30 - 700 - 1.25 * 200  # its refit is owed
    assert plain.left(700, trained) == 1000 - 30 - 700


# --- a look's share of the data ------------------------------------------------------------


def test_a_look_trains_on_a_stratified_share_of_the_training_split_only():
    arrays = data.load_arrays(load_pipeline("digits"))
    picked = data.training_share(arrays, 0.2)
    train_classes = np.bincount(arrays.y_train)
    assert np.array_equal(np.bincount(arrays.y_train[picked]),
                          np.maximum(1, np.round(train_classes * 0.2)).astype(int))
    assert len(set(picked)) == len(picked) and picked.max() < len(arrays.y_train)
    assert set(picked) <= set(data.training_share(arrays, 0.5))  # a larger share holds it
    datasets = data.make_datasets(arrays, batch_size=32)
    seen = sum(int(labels.shape[0]) for _, labels in datasets.share(0.2))
    assert seen == len(picked)
    assert datasets.share(1.0) is datasets.train and datasets.share(0.2) is datasets.share(0.2)


# --- weights a child inherits -------------------------------------------------------------


def candidate(filters_2: int):
    space = load_space("tiny")
    model = tuning.CandidateModel(space, (8, 8, 1), 10, 16.0)
    values = {"depth": 2, "stage_1/filters": 8, "stage_1/kernel_size": 3,
              "stage_1/padding": "same", "stage_1/pool": "none", "stage_2/filters": filters_2,
              "stage_2/kernel_size": 3, "stage_2/padding": "same", "stage_2/pool": "none",
              "reduce": "global_avg", "dense_layers": 0, "learning_rate": 0.01}
    return model, values


@pytest.mark.slow
def test_a_child_starts_from_its_parents_weights_where_a_layer_kept_its_shape(tmp_path):
    hypermodel, values = candidate(filters_2=8)
    parent = hypermodel.build(_hp(values))
    parent.fit(np.random.rand(64, 8, 8, 1) * 16, np.arange(64) % 10, epochs=1, verbose=0)
    checkpoint = tmp_path / "checkpoint.weights.h5"
    parent.save_weights(str(checkpoint))

    _, moved = candidate(filters_2=4)  # one knob moved: stage 2 narrower
    child = hypermodel.build(_hp(moved))
    fresh = {layer.name: layer.get_weights() for layer in child.layers}
    inherited = tuning.inherit(child, tuning.trained_model(hypermodel, values, checkpoint))
    assert inherited == ["stage_1_conv"]  # stage 2 and the output changed shape
    for a, b in zip(child.get_layer("stage_1_conv").get_weights(),
                    parent.get_layer("stage_1_conv").get_weights()):
        np.testing.assert_array_equal(a, b)
    for name in ("stage_2_conv", "output"):
        for a, b in zip(child.get_layer(name).get_weights(), fresh[name]):
            np.testing.assert_array_equal(a, b)

    checkpoint.unlink()  # the parent's weights are gone: the child starts afresh
    assert tuning.trained_model(hypermodel, values, checkpoint) is None
    assert tuning.inherit(child, None) == []


def _hp(values):
    import keras_tuner as kt

    hp = kt.HyperParameters()
    hp.values = dict(values)
    return hp


# --- the pipeline's recipe: augmentations, label smoothing --------------------------------


def test_trainings_on_all_the_data_augment_as_the_pipeline_says_and_looks_do_not():
    _, values = candidate(filters_2=8)
    hypermodel = tuning.CandidateModel(load_space("tiny"), (8, 8, 1), 10, 16.0,
                                       augment=(("flip", "horizontal"), ("translation", 0.1)))
    look = {**values, funnel.SHARE: 0.2, funnel.EPOCHS: 3, funnel.PARENT: ""}
    full = {**values, funnel.SHARE: 1.0, funnel.EPOCHS: 12, funnel.PARENT: "0001"}

    def augments(v):
        return [(layer.kind, layer.config["factor"]) for layer in
                hypermodel.architecture(v).layers if layer.kind.startswith("Random")]

    assert augments(look) == []
    assert augments(full) == [("RandomFlip", "horizontal"), ("RandomTranslation", 0.1)]
    assert augments(values) == augments(full)  # a search without a funnel: every trial
    assert augments({**full, "augment/flip": "vertical"}) == [("RandomFlip", "vertical")]
    # training only: the same parameters and FLOPs, and none in the served model
    assert hypermodel.architecture(full).params == hypermodel.architecture(look).params
    assert hypermodel.architecture(full).flops == hypermodel.architecture(look).flops
    assert not [layer for layer in hypermodel.architecture(full).for_serving().layers
                if layer.kind.startswith("Random")]
    # the full training starts from its look's weights: every layer that has weights
    model = hypermodel.build(_hp(full))
    assert [layer.__class__.__name__ for layer in model.layers
            if layer.__class__.__name__.startswith("Random")] == ["RandomFlip",
                                                                "RandomTranslation"]
    assert tuning.inherit(model, hypermodel.build(_hp(look))) == [
        "stage_1_conv", "stage_2_conv", "output"]


def test_trials_train_with_the_pipelines_label_smoothing_and_serve_without():
    from nas.models import build_model

    _, values = candidate(filters_2=8)
    hypermodel = tuning.CandidateModel(load_space("tiny"), (8, 8, 1), 10, 16.0,
                                       label_smoothing=0.1)
    trained = hypermodel.build(_hp(values))
    labels, probabilities = np.array([3, 0]), np.full((2, 10), 0.05, "float32")
    probabilities[0, 3] = probabilities[1, 1] = 0.55
    # each label's target: 0.9 + 0.1 / 10 on its class, 0.1 / 10 on every other
    targets = np.full((2, 10), 0.01)
    targets[0, 3] = targets[1, 0] = 0.91
    expected = -(targets * np.log(probabilities)).sum(axis=1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(
        trained.loss(labels, probabilities)), expected, rtol=1e-5)
    served = build_model(hypermodel.architecture(values).for_serving(), jit_compile=False)
    assert served.loss == "sparse_categorical_crossentropy"


# --- a schedule that fits the time ----------------------------------------------------------


@pytest.mark.slow
def test_the_learning_rate_decays_over_the_trials_epochs_and_training_stops_in_time():
    schedule = tuning.CosineDecay(0.01, epochs=4)
    assert [round(schedule.rate(e), 6) for e in range(5)] == [0.01, 0.008536, 0.005,
                                                             0.001464, 0.0]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    x, y = np.random.rand(32, 4), np.arange(32) % 2
    rates = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: rates.append(
        float(model.optimizer.learning_rate)))
    history = model.fit(x, y, epochs=4, verbose=0, callbacks=[tuning.CosineDecay(0.01, 4),
                                                              record])
    assert len(history.history["loss"]) == 4 and rates == pytest.approx(
        [0.01, 0.008536, 0.005, 0.001464], abs=1e-6)
    # no time left after the first epoch: it stops there instead of passing the limit
    history = model.fit(x, y, epochs=4, verbose=0, callbacks=[tuning.CosineDecay(0.01, 4, 0.0)])
    assert len(history.history["loss"]) == 1


# --- a whole funnel, and its resume --------------------------------------------------------


@pytest.fixture
def small_funnel(monkeypatch):
    """The funnel on the bundled digits (it is meant for 10,000 images and more), with a
    final-model reserve that fits a test's time limit."""
    monkeypatch.setattr(funnel, "MIN_SAMPLES", 0)
    monkeypatch.setattr(funnel, "RESERVE_SECONDS", 6.0)
    monkeypatch.setattr(funnel, "MIN_FULL_EPOCHS", 2)
    shares = []
    original = data.make_datasets

    def counted(arrays, batch_size, seed=0):
        made = original(arrays, batch_size, seed)

        def share(fraction):
            dataset = made.share(fraction)
            shares.append((fraction, sum(int(y.shape[0]) for _, y in dataset)))
            return dataset

        return data.Datasets(made.train, made.validation, share)

    monkeypatch.setattr(data, "make_datasets", counted)
    return shares


def config(limit: float) -> SearchConfig:
    return SearchConfig(space=load_space("tiny"), pipeline=load_pipeline("digits"),
                        max_trials=1000, time_limit=limit, experiment="funnel")


def runs_of(experiment: str):
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    trials = client.search_runs([found.experiment_id], "tags.`nas.kind` = 'trial'",
                                order_by=["attributes.start_time ASC"], max_results=1000)
    (search,) = client.search_runs([found.experiment_id], "tags.`nas.kind` = 'search'")
    return search, trials


@pytest.mark.slow
def test_a_funnel_looks_at_shares_promotes_the_best_looks_and_ends_at_its_time_limit(
        small_funnel):
    limit = 25.0
    result = run(prepare(config(limit)), Callback())
    search, trials = runs_of("funnel")
    share = {r.data.tags["nas.trial_id"]: float(r.data.params["nas/share"]) for r in trials}
    looks = [r for r in trials if share[r.data.tags["nas.trial_id"]] < 1]
    fulls = [r for r in trials if share[r.data.tags["nas.trial_id"]] == 1]
    assert len(looks) >= 2 and 1 <= len(fulls) <= 3
    assert all(r.info.status == "FINISHED" for r in trials)
    # every look trained on exactly its share of the training data, and only the looks did
    arrays = data.load_arrays(load_pipeline("digits"))
    assert small_funnel == [(funnel.LOOK_SHARE, len(data.training_share(arrays, 0.2)))] * len(
        looks)
    # each full training continues one of the best looks, best first, from its weights
    score = {r.data.tags["nas.trial_id"]: r.data.metrics["objective"] for r in looks}
    first_full_start = fulls[0].info.start_time
    earlier = sorted((r for r in looks if r.info.end_time <= first_full_start),
                     key=lambda r: -r.data.metrics["objective"])
    parents = [r.data.params["nas/parent"] for r in fulls]
    assert parents[0] == earlier[0].data.tags["nas.trial_id"]
    assert len(set(parents)) == len(parents) and all(p in score for p in parents)
    for r in fulls:
        assert int(r.data.params["nas/epochs"]) >= 1
    # the final model is made of full trainings only; the time limit, not the 1000 trials,
    # ended the search (how close its wall time comes to the limit is a benchmark figure:
    # bench/run.py --only fashion, "default's wall / the limit")
    final = search.data.tags["nas.final_trials"].split(",")
    assert final and set(final) <= {r.data.tags["nas.trial_id"] for r in fulls}
    assert "test_accuracy" in search.data.metrics and result.stopped_by_time
    assert len(trials) < 1000  # the time limit ended it
    # the final model was made and logged inside the limit (the deadline and its reserve)
    run_wall = (search.info.end_time - search.info.start_time) / 1000
    assert run_wall <= 1.05 * limit
    # `nas trials` shows the funnel: what each trial trained on
    shown = CliRunner().invoke(main, ["trials", "--experiment", "funnel"])
    assert shown.exit_code == 0, shown.output
    assert f"{len(trials)} trials (as many as its time limit held)" in shown.output
    header, *lines = shown.output.splitlines()[1:]
    assert "  data  " in header
    assert sum(" 20%  " in line for line in lines) == len(looks)
    assert sum(" 100%  " in line for line in lines) == len(fulls)


@pytest.mark.slow
def test_a_funnel_interrupted_mid_way_resumes_the_same_funnel(small_funnel):
    class Stop(Callback):  # Ctrl-C as the fourth trial starts
        def on_trial_begin(self, event):
            if event.trial == 4:
                raise KeyboardInterrupt

    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run(prepare(config(20.0)), Stop())
    spent = time.monotonic() - began
    _, before = runs_of("funnel")
    looked = {r.data.tags["nas.trial_id"] for r in before if r.info.status == "FINISHED"}
    # Three trials ended, the first a look (on a slow machine the looks' part of the 20 s
    # may be spent by then, and the third already a full training).
    assert len(looked) == 3 and float(before[0].data.params["nas/share"]) < 1

    # Resumed with a limit 16 s over what the first part spent (a larger limit grows a
    # search): a full training fits after the reserve, however slow the machine.
    result = run(prepare(config(spent + 16.0)), Callback())
    assert result.resumed
    _, after = runs_of("funnel")
    ids = [r.data.tags["nas.trial_id"] for r in after]
    finished = [i for i, r in zip(ids, after) if r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) and looked <= set(ids)  # none trained twice
    candidates = [tuple(sorted((k, v) for k, v in r.data.params.items()
                               if not k.startswith("nas/")))
                  for r in after if float(r.data.params["nas/share"]) < 1]
    assert len(candidates) == len(set(candidates))  # no candidate looked at twice
    fulls = [r for r in after if float(r.data.params["nas/share"]) == 1]
    assert fulls and fulls[0].data.params["nas/parent"] in ids
