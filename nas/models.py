"""`Architecture` -> compiled `keras.Model`. Chooses nothing: every value comes in."""

from __future__ import annotations

import keras

from nas.architecture import INPUT, Architecture, Layer

__all__ = ["build_model", "layer_model", "make_optimizer"]

_OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate, momentum=0.9),
    "rmsprop": keras.optimizers.RMSprop,
    "nadam": keras.optimizers.Nadam,
}

# Keras's default, 0.99, needs hundreds of steps before the moving statistics that
# inference uses catch up with training: on a small dataset with early stopping a trial
# ends first, and its validation accuracy is near chance (digits: 0.25 test accuracy
# with batch norm instead of 0.98; bench/README.md). 0.9 catches up in a few dozen steps.
BATCH_NORM_MOMENTUM = 0.9

_POOLS = {"MaxPooling2D": keras.layers.MaxPooling2D, "AveragePooling2D": keras.layers.AveragePooling2D}
_MERGES = {"Add": keras.layers.Add, "Multiply": keras.layers.Multiply}
_REDUCERS = {
    "Flatten": keras.layers.Flatten,
    "GlobalAveragePooling2D": keras.layers.GlobalAveragePooling2D,
    "GlobalMaxPooling2D": keras.layers.GlobalMaxPooling2D,
}


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """An optimizer from the fixed table of names the specs allow."""
    return _OPTIMIZERS[name](learning_rate=learning_rate)


def build_model(architecture: Architecture, *, jit_compile: bool | str = "auto",
                mixed_precision: bool = False, label_smoothing: float = 0.0) -> keras.Model:
    """Build and compile the Keras model `architecture` describes.

    With `label_smoothing`, the loss spreads that share of each label's probability over
    the other classes (the loss a trial trains with; a served model is compiled without).

    With `mixed_precision`, every layer computes in float16 on float32 variables, except
    the output layer, which computes in float32 so that the softmax and the loss stay
    numerically safe, and the loss is scaled (`LossScaleOptimizer`). The policy is given
    to each layer, not set globally: Keras's `clear_session` would silently reset a
    global one to float32.

    Raises:
        ValueError: the architecture is impossible (check `architecture.impossible` first).
    """
    if architecture.impossible:
        raise ValueError(f"cannot build an impossible candidate: {architecture.impossible}")
    inputs = keras.Input(shape=architecture.input_shape, name=INPUT)
    x, outputs = inputs, {INPUT: inputs}
    policy = "mixed_float16" if mixed_precision else "float32"
    for layer in architecture.layers:
        made = _make_layer(layer, policy)
        if layer.kind in _MERGES:
            x = made([outputs[name] for name in layer.inputs])
        elif layer.kind == "Resizing":
            # Keras's image layers default `training` to True when a call leaves it out,
            # and pass that on to every layer after them: a served model (`model.export`
            # traces its call without it) would normalize each batch by its own
            # statistics. A resize is the same in training and inference: say so.
            x = made(x, training=False)
        else:
            x = made(outputs[layer.inputs[0]] if layer.inputs else x)
        outputs[layer.name] = x
    model = keras.Model(inputs, x, name="candidate")
    values = architecture.values
    optimizer = make_optimizer(values["optimizer"], values["learning_rate"])
    if mixed_precision:  # float16 gradients underflow without it
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=(_smoothed_loss(label_smoothing, architecture.num_classes) if label_smoothing
              else "sparse_categorical_crossentropy"),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def _smoothed_loss(label_smoothing: float, classes: int):
    """Sparse categorical cross-entropy with label smoothing (Keras's smooths one-hot
    labels only)."""
    def smoothed_sparse_categorical_crossentropy(y_true, y_pred):
        labels = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"),
                                   classes)
        return keras.losses.categorical_crossentropy(labels, y_pred,
                                                     label_smoothing=label_smoothing)
    return smoothed_sparse_categorical_crossentropy


def _make_layer(layer, policy: str) -> keras.layers.Layer:
    c = layer.config
    common = dict(name=layer.name.replace("/", "_"),
                  dtype="float32" if layer.name == "output" else policy)
    if layer.kind == "Rescaling":
        return keras.layers.Rescaling(c["scale"], c["offset"], **common)
    if layer.kind == "RandomFlip":  # the augmentations act in training only
        return keras.layers.RandomFlip(c["factor"], **common)
    if layer.kind == "RandomRotation":
        return keras.layers.RandomRotation(c["factor"], **common)
    if layer.kind == "RandomTranslation":
        return keras.layers.RandomTranslation(c["factor"], c["factor"], **common)
    if layer.kind == "RandomZoom":
        return keras.layers.RandomZoom(c["factor"], **common)
    if layer.kind == "RandomContrast":  # on the rescaled pixels
        return keras.layers.RandomContrast(c["factor"], value_range=(0, 1), **common)
    if layer.kind == "Conv2D":
        return keras.layers.Conv2D(c["filters"], c["kernel_size"], strides=c["strides"],
                                   padding=c["padding"], use_bias=c["use_bias"], **common)
    if layer.kind == "DepthwiseConv2D":
        return keras.layers.DepthwiseConv2D(c["kernel_size"], strides=c["strides"],
                                            padding=c["padding"], use_bias=c["use_bias"],
                                            **common)
    if layer.kind == "Resizing":
        return keras.layers.Resizing(c["height"], c["width"], **common)
    if layer.kind in _MERGES:
        return _MERGES[layer.kind](**common)
    if layer.kind == "SeparableConv2D":
        return keras.layers.SeparableConv2D(c["filters"], c["kernel_size"],
                                            strides=c["strides"], padding=c["padding"],
                                            use_bias=c["use_bias"], **common)
    if layer.kind == "BatchNormalization":
        return keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, **common)
    if layer.kind == "Activation":
        return keras.layers.Activation(c["activation"], **common)
    if layer.kind in _POOLS:
        return _POOLS[layer.kind](c["pool_size"], strides=c["strides"], **common)
    if layer.kind in _REDUCERS:
        return _REDUCERS[layer.kind](**({"keepdims": True} if c.get("keepdims") else {}),
                                     **common)
    if layer.kind == "Dropout":
        return keras.layers.Dropout(c["rate"], **common)
    if layer.kind == "Dense":
        return keras.layers.Dense(c["units"], activation=c["activation"], **common)
    raise ValueError(f"unknown layer type {layer.kind!r}")


def layer_model(layer: Layer | None, input_shape: tuple[int, ...],
                *other_shapes: tuple[int, ...]) -> keras.Model:
    """A model of `layer` alone, built as `build_model` builds it, on an input of
    `input_shape` (batch size left out), and of `other_shapes` for a layer that takes
    several (an Add, a Multiply); of no layer (None), the input passed through.

    What `nas.latency` times to measure one layer (the empty model: what every model
    costs its runtime besides its layers).
    """
    inputs = [keras.Input(shape=tuple(shape), name=name) for shape, name in zip(
        (input_shape, *other_shapes), (INPUT, *(f"other_{n}" for n in range(
            1, len(other_shapes) + 1))))]
    if layer is None:
        return keras.Model(inputs[0], keras.layers.Identity()(inputs[0]), name="empty")
    made = _make_layer(layer, "float32")
    return keras.Model(inputs if other_shapes else inputs[0],
                       made(inputs if layer.kind in _MERGES else inputs[0]), name="layer")
