"""GPU switches (mixed precision, XLA, memory growth, the device tag), tested on the CPU."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from nas.cli import main
from nas.specs import load_space


@pytest.mark.slow
def test_mixed_precision_computes_in_float16_and_outputs_float32():
    import keras
    import numpy as np

    from nas.architecture import Architecture
    from nas.models import build_model

    values = {"depth": 1, "stage_1/filters": 4, "stage_1/kernel_size": 3,
              "stage_1/padding": "same", "stage_1/pool": "max", "reduce": "flatten",
              "dense_layers": 0, "learning_rate": 0.01}
    architecture = Architecture.from_values(load_space("tiny"), values, (8, 8, 1), 3, 16.0)
    keras.backend.clear_session()  # resets a global dtype policy; the model's own stays
    model = build_model(architecture, jit_compile=True, mixed_precision=True)
    conv = model.get_layer("stage_1_conv")
    assert conv.compute_dtype == "float16" and conv.variable_dtype == "float32"
    assert model.get_layer("output").compute_dtype == "float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x = np.random.default_rng(0).uniform(0, 16, (32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 3
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)  # XLA on the CPU
    assert np.isfinite(history.history["loss"]).all()
    assert model.predict(x[:2], verbose=0).dtype == np.float32
    assert build_model(architecture).get_layer("stage_1_conv").compute_dtype == "float32"


@pytest.mark.slow
def test_search_with_gpu_switches_runs_on_the_cpu_and_logs_its_device(monkeypatch):
    import keras

    import nas.tuning

    real_build, built = nas.tuning.build_model, []

    def build_model(architecture, **kwargs):  # every trial's model, as it trains
        model = real_build(architecture, **kwargs)
        built.append(model)
        return model

    monkeypatch.setattr(nas.tuning, "build_model", build_model)
    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--max-trials", "2",
                                       "--epochs", "2", "--mixed-precision", "--jit-compile",
                                       "--experiment", "gpu"])
    assert result.exit_code == 0, result.output
    assert "2 trials finished, 0 failed" in result.output
    assert "logged to MLflow as runs:/" in result.output  # served in float32
    assert "warning" not in result.output
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("gpu").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["nas.kind"] == "search"]
    trials = [r for r in runs if r.data.tags["nas.kind"] == "trial"]
    assert parent.data.params["mixed_precision"] == "true"
    assert parent.data.params["jit_compile"] == "true"
    assert [t.info.status for t in trials] == ["FINISHED", "FINISHED"]
    assert {t.data.tags["nas.device"] for t in trials} == {"/device:CPU:0"}
    # Every trial trained in mixed precision, not only the first.
    assert len(built) == 2
    for model in built:
        assert model.get_layer("stage_1_conv").compute_dtype == "float16"
        assert model.get_layer("output").compute_dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # never changed


def test_memory_growth_is_set_on_every_gpu(monkeypatch):
    import tensorflow as tf

    from nas import assembly, search
    from nas.specs import load_pipeline

    gpus = ["GPU:0", "GPU:1"]
    grown = []
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth",
                        lambda device, enable: grown.append((device, enable)))
    config = search.SearchConfig(space=load_space("tiny"), pipeline=load_pipeline("digits"))
    assembly.configure_tensorflow(config)
    assert grown == [("GPU:0", True), ("GPU:1", True)]


def test_cli_sets_memory_growth_before_tensorflow_starts():
    import subprocess
    import sys

    code = ("import os, sys\nfrom nas.cli import main\n"
            "try:\n    main(['search', '--max-trials', '0'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('TF_FORCE_GPU_ALLOW_GROWTH'), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={k: v for k, v in __import__("os").environ.items()
                                          if k != "TF_FORCE_GPU_ALLOW_GROWTH"})
    assert out.stdout.strip().splitlines()[-1] == "true False"
