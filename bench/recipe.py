"""What a recipe change adds to a full training of the funnel's typical finalist on
Fashion-MNIST, on the validation data only (nas's own split: 20% of the 60,000 training
images); the test set is not read. Not a bench figure: the experiment behind the recipe
table of bench/README.md ("what the full trainings' recipe could add").

    python bench/recipe.py MODE EPOCHS    # MODE: none, or a +-joined subset of
                                          # flip, translate, ls (label smoothing 0.1),
                                          # erase (random erasing), wide (64, 128, 128
                                          # filters)

Prints one JSON line: the mode, parameters, fit seconds, validation accuracy per epoch, and
the last epoch's validation accuracy with test-time flips (the mean of the predictions for
each image and its mirror image).
"""
import json
import sys
import time

import keras
import numpy as np

from nas.data import load_arrays
from nas.specs import load_pipeline

mode, epochs = sys.argv[1], int(sys.argv[2])
arrays = load_arrays(load_pipeline("fashion_mnist"))
x, y, xv, yv = arrays.x_train, arrays.y_train, arrays.x_val, arrays.y_val
scale = arrays.pixel_scale
keras.utils.set_random_seed(0)
layers = [keras.Input(x.shape[1:]), keras.layers.Rescaling(1.0 / scale)]
if "flip" in mode:
    layers.append(keras.layers.RandomFlip("horizontal"))
if "erase" in mode:
    layers.append(keras.layers.RandomErasing(value_range=(0, 1)))
if "translate" in mode:
    layers.append(keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant"))
for filters in ((64, 128, 128) if "wide" in mode else (32, 64, 64)):
    layers += [keras.layers.Conv2D(filters, 3, padding="same"), keras.layers.BatchNormalization(),
               keras.layers.ReLU(), keras.layers.MaxPooling2D()]
layers += [keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"),
           keras.layers.Dropout(0.25), keras.layers.Dense(10, activation="softmax")]
model = keras.Sequential(layers)
steps = int(np.ceil(len(x) / 128)) * epochs
if "ls" in mode:
    y, yv = keras.utils.to_categorical(y, 10), keras.utils.to_categorical(yv, 10)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)
else:
    loss = "sparse_categorical_crossentropy"
model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)),
              loss=loss, metrics=["accuracy"])
start = time.time()
h = model.fit(x, y, batch_size=128, epochs=epochs, validation_data=(xv, yv), verbose=0)
seconds = time.time() - start
mean = (model.predict(xv, verbose=0) + model.predict(xv[:, :, ::-1], verbose=0)) / 2
labels = yv.argmax(-1) if yv.ndim > 1 else yv
print(json.dumps({"mode": mode, "params": model.count_params(), "seconds": seconds,
                  "val": [round(v, 4) for v in h.history["val_accuracy"]],
                  "val_flips": round(float((mean.argmax(-1) == labels).mean()), 4)}))
