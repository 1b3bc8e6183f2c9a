"""Spec validation: every error names the file, the field path, the value and what is allowed."""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml

from nas.specs import SpecError, builtin_pipelines, builtin_spaces, load_pipeline, load_space

BASE_SPACE = {
    "name": "t",
    "stages": {
        "depth": {"min": 1, "max": 2},
        "conv": {"filters": [4, 8], "kernel_size": [3, 5], "stride": 1, "padding": "same",
                 "activation": "relu", "batch_norm": False},
        "pointwise": False,
        "pool": {"type": ["max", "none"], "size": 2},
    },
    "head": {"reduce": "flatten", "dense": {"layers": 0, "units": 16, "dropout": 0.0}},
    "optimizer": {"name": "adam", "learning_rate": 0.01},
}


def write_space(tmp_path, change=None, name="space.yaml"):
    import copy

    data = copy.deepcopy(BASE_SPACE)
    if change:
        change(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_builtins_load():
    assert {"cnn", "lenet", "mobile", "resnet", "tiny"} <= set(builtin_spaces())
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "shapes"} <= set(builtin_pipelines())
    for name in builtin_spaces():
        assert load_space(name).name == name
    for name in builtin_pipelines():
        assert load_pipeline(name).name == name


def test_cnn_space_has_every_classic_knob():
    space = load_space("cnn")
    assert space.padding.choices == ("same", "valid")
    assert set(space.pool_type.choices) == {"max", "avg", "none"}
    assert space.pointwise.choices == (False, True)
    assert space.batch_norm.choices == (False, True)
    assert space.learning_rate.sampling == "log"
    assert set(space.reduce.choices) == {"flatten", "global_avg", "global_max"}


def test_a_valid_space_file(tmp_path):
    space = load_space(write_space(tmp_path))
    assert space.depth.values() == [1, 2]
    assert space.filters.choices == (4, 8)
    assert space.stride.is_fixed and space.stride.fixed == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(colour="red"),
         "colour: unknown key; allowed keys are ['augment', 'constraints', 'head', 'name', "
         "'optimizer', 'resolution', 'stages']"),
        (lambda d: d.update(augment={"blur": 0.1}),
         "augment.blur: unknown key; allowed keys are ['contrast', 'flip', 'rotation', "
         "'translation', 'zoom']"),
        (lambda d: d.update(augment={"rotation": [0.0, 1.5]}),
         "augment.rotation: 1.5 is not in [0.0, 1.0)"),
        (lambda d: d.update(augment={"zoom": {"min": -0.1, "max": 0.2}}),
         "augment.zoom.min: -0.1 is below the minimum 0.0"),
        (lambda d: d.update(augment={"flip": "diagonal"}),
         "augment.flip: 'diagonal' is not one of ['none', 'horizontal', 'vertical', "
         "'horizontal_and_vertical']"),
        (lambda d: d.update(augment=[0.1]), "augment: [0.1] is not a mapping"),
        (lambda d: d["stages"]["conv"].update(padding="full"),
         "stages.conv.padding: 'full' is not one of ['same', 'valid']"),
        (lambda d: d["stages"]["conv"].update(padding=["same", "full"]),
         "stages.conv.padding: 'full' is not one of ['same', 'valid']"),
        (lambda d: d["stages"]["pool"].update(type="median"),
         "stages.pool.type: 'median' is not one of ['max', 'avg', 'none']"),
        (lambda d: d["optimizer"].update(name="adagrad"),
         "optimizer.name: 'adagrad' is not one of ['adam', 'adamw', 'sgd', 'rmsprop', 'nadam']"),
        (lambda d: d["stages"]["conv"].update(filters=[]),
         "stages.conv.filters: the list of choices is empty"),
        (lambda d: d["stages"].update(depth={"min": 3, "max": 1}),
         "stages.depth: min 3 is greater than max 1"),
        (lambda d: d["stages"]["conv"].update(kernel_size=0),
         "stages.conv.kernel_size: 0 is below the minimum 1"),
        (lambda d: d["stages"]["conv"].update(stride=[1, 0]),
         "stages.conv.stride: 0 is below the minimum 1"),
        (lambda d: d["stages"]["conv"].update(filters=0),
         "stages.conv.filters: 0 is below the minimum 1"),
        (lambda d: d["stages"]["pool"].update(size=0),
         "stages.pool.size: 0 is below the minimum 1"),
        (lambda d: d["head"]["dense"].update(dropout=1.0),
         "head.dense.dropout: 1.0 is not in [0.0, 1.0)"),
        (lambda d: d["head"]["dense"].update(dropout=-0.1),
         "head.dense.dropout: -0.1 is below the minimum 0.0"),
        (lambda d: d["stages"]["conv"].update(filters="many"),
         "stages.conv.filters: 'many' is not a number"),
        (lambda d: d["stages"]["conv"].update(filters=2.5),
         "stages.conv.filters: 2.5 is not a whole number"),
        (lambda d: d["stages"]["conv"].update(batch_norm="yes"),
         "stages.conv.batch_norm: 'yes' is not true or false"),
        (lambda d: d["stages"]["conv"].update(filters={"min": 4, "max": 8, "sampling": "cubic"}),
         "stages.conv.filters.sampling: 'cubic' is not one of ['linear', 'log', 'reverse_log']"),
        (lambda d: d["stages"]["conv"].update(filters={"min": 4, "maximum": 8}),
         "stages.conv.filters.maximum: unknown key; allowed keys are ['max', 'min', 'sampling', 'step']"),
        (lambda d: d["stages"]["conv"].pop("filters"),
         "stages.conv.filters: is required"),
        (lambda d: d["head"].update(reduce="mean"),
         "head.reduce: 'mean' is not one of ['flatten', 'global_avg', 'global_max']"),
        (lambda d: d["stages"].update(conv=[1, 2]),
         "stages.conv: [1, 2] is not a mapping"),
    ],
)
def test_space_errors_name_file_field_value_and_allowed(tmp_path, change, message):
    path = write_space(tmp_path, change)
    with pytest.raises(SpecError) as caught:
        load_space(path)
    assert str(caught.value) == f"{path}: {message}"


def test_yaml_that_does_not_parse_names_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages: [1, 2\nhead: {}\n")
    with pytest.raises(SpecError, match=re.escape(f"{path}: line 3: not valid YAML")):
        load_space(str(path))


def test_missing_file_and_unknown_name():
    with pytest.raises(SpecError, match=r"^nope\.yaml: no such file$"):
        load_space("nope.yaml")
    with pytest.raises(SpecError, match=re.escape(
            "nope: no such file, and not a built-in; built-ins are ['cnn', 'lenet', 'mobile', 'resnet', 'tiny']")):
        load_space("nope")


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_space(str(path))


def test_pipeline_defaults_and_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""
        data: {source: directory, path: data, image_size: 12}
        objective: val_loss
    """))
    pipeline = load_pipeline(str(path))
    assert pipeline.name == "p"
    assert pipeline.path == str(tmp_path / "data")
    assert pipeline.image_size == (12, 12)
    assert pipeline.direction == "min"
    assert (pipeline.epochs, pipeline.batch_size, pipeline.early_stopping_patience) == (10, 64, 3)
    assert pipeline.augment == () and pipeline.label_smoothing == 0.0
    assert pipeline.test_time_flips is False
    path.write_text("data: {source: digits}\ntrain: {augment: {zoom: 0.1, flip: horizontal}}")
    assert load_pipeline(str(path)).augment == (("flip", "horizontal"), ("zoom", 0.1))


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: {source: imagenet}",
         "data.source: 'imagenet' is not one of ['digits', 'mnist', 'fashion_mnist', 'cifar10', "
         "'directory', 'npz']"),
        ("data: {source: npz}", "data.path: is required for source 'npz'"),
        ("data: {source: digits, path: x}",
         "data.path: only applies to the directory, npz, mnist, fashion_mnist and cifar10 "
         "sources, not 'digits'"),
        ("data: {source: digits}\ntrain: {epochs: 0}", "train.epochs: 0 is below the minimum 1"),
        ("data: {source: digits, validation_split: 1.5}",
         "data.validation_split: 1.5 is not in [0.0, 1.0)"),
        ("data: {source: digits}\nobjective: f1",
         "objective: 'f1' is not one of ['val_accuracy', 'val_loss', 'accuracy', 'loss']"),
        ("data: {source: digits}\ntrain: {epoch: 3}",
         "train.epoch: unknown key; allowed keys are ['augment', 'batch_size', "
         "'early_stopping_patience', 'epochs', 'label_smoothing', 'test_time_flips']"),
        ("data: {source: digits}\ntrain: {test_time_flips: horizontal}",
         "train.test_time_flips: 'horizontal' is not true or false"),
        ("data: {source: digits}\ntrain: {label_smoothing: 1.0}",
         "train.label_smoothing: 1.0 is not in [0.0, 1.0)"),
        ("data: {source: digits}\ntrain: {augment: {flip: diagonal}}",
         "train.augment.flip: 'diagonal' is not one of ['none', 'horizontal', 'vertical', "
         "'horizontal_and_vertical']"),
        ("data: {source: digits}\ntrain: {augment: {translation: [0.1, 0.2]}}",
         "train.augment.translation: [0.1, 0.2] is not a number"),
        ("data: {source: digits}\ntrain: {augment: {blur: 1}}",
         "train.augment.blur: unknown key; allowed keys are ['contrast', 'flip', 'rotation', "
         "'translation', 'zoom']"),
        ("data: {source: digits, cache: memory}",
         "data.cache: only applies to the directory source, not 'digits'"),
        ("data: {source: directory, path: ., cache: disk}",
         "data.cache: 'disk' is not one of ['auto', 'memory', 'none']"),
        ("data: {source: digits}\nconstraints: {max_params: 0}",
         "constraints.max_params: 0 is below the minimum 1"),
    ],
)
def test_pipeline_errors(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_pipeline(str(path))
    assert str(caught.value) == f"{path}: {message}"


def test_the_package_re_exports_its_public_api_lazily():
    import subprocess
    import sys

    code = ("import sys, nas\n"
            "before = {'tensorflow' in sys.modules, 'mlflow' in sys.modules}\n"
            "names = [getattr(nas, n).__name__ for n in nas.__all__]\n"
            "print(before, len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    import nas

    assert out.stdout.split() == ["{False}", str(len(nas.__all__))]
    assert {"SearchConfig", "load_space", "Architecture", "prepare", "run"} <= set(nas.__all__)
