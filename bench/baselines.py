"""Hand-written baselines the figures share (bench/run.py's quality, bench/fashion.py)."""

from __future__ import annotations

__all__ = ["small_cnn_build"]


def small_cnn_build(input_shape, num_classes, pixel_scale):
    """The KerasTuner tutorial's kind of build function: a small CNN and a few knobs."""
    import keras

    def build(hp):
        inputs = keras.Input(input_shape)
        x = keras.layers.Rescaling(1.0 / pixel_scale)(inputs)
        for layer in range(hp.Int("conv_layers", 1, 2)):
            x = keras.layers.Conv2D(hp.Choice(f"filters_{layer}", [16, 32, 64]), 3,
                                    padding="same", activation="relu")(x)
            x = keras.layers.MaxPooling2D(2)(x)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(hp.Choice("units", [32, 64, 128]), activation="relu")(x)
        x = keras.layers.Dropout(hp.Float("dropout", 0.0, 0.5, step=0.1))(x)
        outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.Adam(hp.Float("learning_rate", 1e-4, 1e-2,
                                                     sampling="log")),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    return build
