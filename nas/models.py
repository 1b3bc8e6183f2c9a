"""`Architecture` -> compiled `keras.Model`. Chooses nothing: every value comes in."""

from __future__ import annotations

import keras

from nas.architecture import Architecture

__all__ = ["build_model", "make_optimizer"]

_OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate, momentum=0.9),
    "rmsprop": keras.optimizers.RMSprop,
    "nadam": keras.optimizers.Nadam,
}

_POOLS = {"MaxPooling2D": keras.layers.MaxPooling2D, "AveragePooling2D": keras.layers.AveragePooling2D}
_REDUCERS = {
    "Flatten": keras.layers.Flatten,
    "GlobalAveragePooling2D": keras.layers.GlobalAveragePooling2D,
    "GlobalMaxPooling2D": keras.layers.GlobalMaxPooling2D,
}


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """An optimizer from the fixed table of names the specs allow."""
    return _OPTIMIZERS[name](learning_rate=learning_rate)


def build_model(architecture: Architecture, *, jit_compile: bool | str = "auto") -> keras.Model:
    """Build and compile the Keras model `architecture` describes.

    The output layer computes in float32 so that a mixed-precision policy keeps the
    softmax and the loss numerically safe.

    Raises:
        ValueError: the architecture is impossible (check `architecture.impossible` first).
    """
    if architecture.impossible:
        raise ValueError(f"cannot build an impossible candidate: {architecture.impossible}")
    inputs = keras.Input(shape=architecture.input_shape, name="image")
    x = inputs
    for layer in architecture.layers:
        x = _make_layer(layer)(x)
    model = keras.Model(inputs, x, name="candidate")
    values = architecture.values
    model.compile(
        optimizer=make_optimizer(values["optimizer"], values["learning_rate"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def _make_layer(layer) -> keras.layers.Layer:
    c, name = layer.config, layer.name.replace("/", "_")
    if layer.kind == "Rescaling":
        return keras.layers.Rescaling(c["scale"], c["offset"], name=name)
    if layer.kind == "Conv2D":
        return keras.layers.Conv2D(c["filters"], c["kernel_size"], strides=c["strides"],
                                   padding=c["padding"], use_bias=c["use_bias"], name=name)
    if layer.kind == "BatchNormalization":
        return keras.layers.BatchNormalization(name=name)
    if layer.kind == "Activation":
        return keras.layers.Activation(c["activation"], name=name)
    if layer.kind in _POOLS:
        return _POOLS[layer.kind](c["pool_size"], strides=c["strides"], name=name)
    if layer.kind in _REDUCERS:
        return _REDUCERS[layer.kind](name=name)
    if layer.kind == "Dropout":
        return keras.layers.Dropout(c["rate"], name=name)
    if layer.kind == "Dense":
        # The output layer stays float32 under mixed precision.
        dtype = "float32" if layer.name == "output" else None
        return keras.layers.Dense(c["units"], activation=c["activation"], name=name, dtype=dtype)
    raise ValueError(f"unknown layer type {layer.kind!r}")
