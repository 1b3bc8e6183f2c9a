"""Architecture arithmetic (shapes, parameters, FLOPs) against what Keras builds."""

from __future__ import annotations

import random

import pytest

from nas.architecture import Architecture, hyperparameter_specs
from nas.specs import Constraints, load_space


def sample_values(space, rng: random.Random) -> dict:
    """Random values for every active knob, the way an oracle would pick them."""
    values = {}
    for spec in hyperparameter_specs(space):
        if not all(values.get(parent) in allowed for parent, allowed in spec.conditions):
            continue
        choices = spec.knob.values()
        if choices is None:
            values[spec.name] = rng.uniform(spec.knob.min, spec.knob.max)
        else:
            values[spec.name] = rng.choice(choices)
    return values


def candidates(space_name: str, input_shape, count: int, seed: int = 0):
    space = load_space(space_name)
    rng = random.Random(seed)
    for _ in range(count):
        yield Architecture.from_values(space, sample_values(space, rng), input_shape, 10, 16.0)


@pytest.mark.parametrize("space_name, input_shape", [
    ("cnn", (8, 8, 1)), ("cnn", (28, 28, 1)), ("cnn", (32, 32, 3)),
    ("lenet", (8, 8, 1)), ("tiny", (8, 8, 1)),
])
def test_params_and_shapes_match_keras_for_every_valid_candidate(space_name, input_shape):
    import keras

    from nas.models import build_model

    built = 0
    for architecture in candidates(space_name, input_shape, 20):
        if architecture.impossible:
            continue
        model = build_model(architecture)
        assert architecture.params == model.count_params(), architecture.table()
        keras_shapes = [tuple(layer.output.shape[1:]) for layer in model.layers[1:]]
        assert [layer.output_shape for layer in architecture.layers] == keras_shapes
        built += 1
    keras.backend.clear_session()  # once: after each model, it took 9/10 of the test's time
    assert built >= 8


def keras_from_values(values: dict, input_shape, num_classes: int = 10):
    """The candidate built straight from its values with Keras's layers, with no guard,
    written apart from `nas.models` and `nas.architecture` (the rules as the docs state
    them, every block kind included)."""
    import keras

    L = keras.layers
    x = inputs = keras.Input(input_shape)
    if "resolution" in values and tuple(input_shape[:2]) != (values["resolution"],) * 2:
        x = L.Resizing(values["resolution"], values["resolution"])(x)

    def normalized(y, bn):
        return L.BatchNormalization()(y) if bn else y

    def shortcut(block_input, made, filters, stride, bn):
        if stride > 1 or block_input.shape[-1] != filters:
            block_input = normalized(L.Conv2D(filters, 1, stride, "same", use_bias=not bn)(
                block_input), bn)
        return L.Add()([made, block_input])

    def excite(y, squeezed):
        gate = L.GlobalAveragePooling2D(keepdims=True)(y)
        gate = L.Conv2D(squeezed, 1, activation="relu")(gate)
        gate = L.Conv2D(y.shape[-1], 1, activation="sigmoid")(gate)
        return L.Multiply()([y, gate])

    for s in range(1, values["depth"] + 1):
        p = f"stage_{s}/"
        filters = max(1, int(values[p + "filters"] * values.get("width", 1.0) + 0.5))
        block, bn = values.get(p + "block", "plain"), values[p + "batch_norm"]
        kernel, stride, se = values[p + "kernel_size"], values[p + "stride"], values.get(
            p + "se", 0)
        channels = x.shape[-1]
        if block == "mbconv":
            for n in range(values.get(p + "convs", 1)):
                block_input, step = x, stride if n == 0 else 1
                wide = x.shape[-1] * values[p + "expand_ratio"]
                if values[p + "expand_ratio"] > 1:
                    x = L.Activation("relu")(normalized(L.Conv2D(wide, 1, use_bias=not bn)(x), bn))
                x = L.DepthwiseConv2D(kernel, step, "same", use_bias=not bn)(x)
                x = L.Activation("relu")(normalized(x, bn))
                if se:
                    x = excite(x, max(1, int(block_input.shape[-1] * se)))
                x = normalized(L.Conv2D(filters, 1, use_bias=not bn)(x), bn)
                x = shortcut(block_input, x, filters, step, bn)
        else:
            block_input = x
            conv = L.SeparableConv2D if values.get(p + "separable") else L.Conv2D
            padding = values.get(p + "padding", "same")
            for n in range(values.get(p + "convs", 1)):
                x = normalized(conv(filters, kernel, stride if n == 0 else 1, padding,
                                    use_bias=not bn)(x), bn)
                if block == "plain" or n < values.get(p + "convs", 1) - 1:
                    x = L.Activation("relu")(x)
            if block == "residual":
                if se:
                    x = excite(x, max(1, int(channels * se)))
                x = L.Activation("relu")(shortcut(block_input, x, filters, stride, bn))
            if values.get(p + "pointwise"):
                x = L.Conv2D(filters, 1)(x)
        if values[p + "pool"] != "none":
            pool = L.MaxPooling2D if values[p + "pool"] == "max" else L.AveragePooling2D
            x = pool(values[p + "pool_size"])(x)
        if any(d < 1 for d in x.shape[1:]):
            raise ValueError(f"stage {s} collapsed to {x.shape}")
    x = L.Flatten()(x) if values["reduce"] == "flatten" else L.GlobalAveragePooling2D()(x)
    for d in range(1, values["dense_layers"] + 1):
        x = L.Dense(values[f"dense_{d}/units"])(x)
    return keras.Model(inputs, L.Dense(num_classes)(x))


def test_a_hand_computed_stage_of_two_convs_and_a_separable_conv():
    import dataclasses

    from nas.specs import Knob

    space = load_space("tiny")
    stacked = dataclasses.replace(space, convs=Knob("int", (2,)))
    values = {"depth": 1, "stage_1/filters": 8, "stage_1/kernel_size": 3,
              "stage_1/padding": "valid", "stage_1/pool": "none", "reduce": "flatten",
              "dense_layers": 0, "learning_rate": 0.01}
    a = Architecture.from_values(stacked, values, (8, 8, 1), 10)
    first, second = a.layers[1], a.layers[3]  # conv, act, conv_2, act_2
    assert [layer.name for layer in a.layers[1:5]] == [
        "stage_1/conv", "stage_1/act", "stage_1/conv_2", "stage_1/act_2"]
    assert (first.output_shape, first.params, first.flops) == ((6, 6, 8), 80, 2 * 9 * 8 * 36)
    assert (second.output_shape, second.params) == ((4, 4, 8), 9 * 8 * 8 + 8)
    assert second.flops == 2 * 9 * 8 * 8 * 16
    separable = Architecture.from_values(
        dataclasses.replace(stacked, separable=Knob("bool", (True,))), values, (8, 8, 1), 10)
    conv = separable.layers[1]  # depthwise 3x3 on 1 channel, then 1 -> 8, and a bias each
    assert (conv.kind, conv.params, conv.flops) == ("SeparableConv2D", 9 + 8 + 8,
                                                     2 * (9 + 8) * 36)
    tight = Architecture.from_values(stacked, values, (4, 4, 1), 10)
    assert tight.impossible == ("stage 1: conv 2 of 2, 3x3 with valid padding, does not fit "
                                "the 2x2 feature map")


def test_impossible_exactly_when_keras_cannot_build_it():
    import keras

    impossible = 0
    for architecture in candidates("cnn", (8, 8, 1), 50, seed=3):
        try:
            model = keras_from_values(architecture.values, architecture.input_shape)
        except ValueError:
            assert architecture.impossible, architecture.table()
            assert architecture.impossible.startswith("stage ")
            impossible += 1
        else:
            assert architecture.impossible is None
            assert architecture.params == model.count_params()
    keras.backend.clear_session()  # once: after each model, it took 9/10 of the test's time
    assert impossible >= 5


def test_a_hand_computed_candidate():
    space = load_space("tiny")
    values = {"depth": 1, "stage_1/filters": 8, "stage_1/kernel_size": 3,
              "stage_1/padding": "valid", "stage_1/pool": "max", "reduce": "flatten",
              "dense_layers": 1, "dense_1/units": 16, "learning_rate": 0.01}
    a = Architecture.from_values(space, values, (8, 8, 1), 10, 16.0)
    assert a.impossible is None
    # conv 3x3 valid on 8x8 -> 6x6x8: 3*3*1*8 + 8 = 80 params, 2*9*1*8*36 FLOPs
    conv = a.layers[1]
    assert (conv.output_shape, conv.params, conv.flops) == ((6, 6, 8), 80, 2 * 9 * 8 * 36)
    # pool 2x2 -> 3x3x8 -> flatten 72 -> dense 16 -> output 10
    assert a.layers[3].output_shape == (3, 3, 8)
    assert a.params == 80 + (72 * 16 + 16) + (16 * 10 + 10)
    assert "total" in a.table() and "Conv2D 8 3x3 stride 1 valid" in a.table()


def test_collapse_names_the_stage_and_budget_names_the_limit():
    space = load_space("tiny")
    values = {"depth": 2, "reduce": "flatten", "dense_layers": 0, "learning_rate": 0.01}
    for stage in (1, 2):
        values.update({f"stage_{stage}/filters": 4, f"stage_{stage}/kernel_size": 5,
                       f"stage_{stage}/padding": "valid", f"stage_{stage}/pool": "none"})
    a = Architecture.from_values(space, values, (8, 8, 1), 10, 16.0)
    assert a.impossible == ("stage 2: a 5x5 conv with valid padding and stride 1 does not fit "
                            "the 4x4 feature map")
    values["stage_2/padding"] = "same"
    b = Architecture.from_values(space, values, (8, 8, 1), 10, 16.0)
    assert b.impossible is None
    assert b.over_budget(Constraints(max_params=10)) == f"{b.params:,} parameters > max_params 10"
    assert b.over_budget(Constraints(max_params=b.params, max_flops=b.flops)) is None


def test_deciding_a_candidate_builds_no_tensorflow_graph():
    import subprocess
    import sys

    code = (
        "import sys, random\n"
        "from nas.architecture import Architecture\n"
        "from nas.specs import load_space\n"
        "s = load_space('cnn')\n"
        "a = Architecture.from_values(s, {'depth': 3, 'reduce': 'flatten', 'dense_layers': 0, "
        "'optimizer': 'adam', 'learning_rate': 0.001, **{f'stage_{i}/{k}': v for i in (1, 2, 3) "
        "for k, v in dict(filters=16, kernel_size=5, stride=2, padding='valid', batch_norm=False,"
        " pointwise=False, pool='none').items()}}, (8, 8, 1), 10)\n"
        "assert a.impossible\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
