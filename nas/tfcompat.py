"""TensorFlow internals we touch, checked against tensorflow 2.21.0 (Keras 3.15.1).

The private names used: `tensorflow.python.framework.ops._gradient_registry` and its
`_registry` dict (a `tensorflow.python.framework.registry.Registry`). Should they move,
each function here does nothing: what they save is memory, not correctness.
"""

from __future__ import annotations

from tensorflow.python.framework import ops as _ops

CHECKED_AGAINST = "2.21.0"


def _gradients() -> dict | None:
    return getattr(getattr(_ops, "_gradient_registry", None), "_registry", None)


def custom_gradients() -> set:
    """The names in TensorFlow's global gradient registry now (see `forget_custom_gradients`)."""
    registry = _gradients()
    return set(registry) if registry is not None else set()


def forget_custom_gradients(before: set) -> None:
    """Drop the custom gradients registered since `before` (`custom_gradients()`).

    Every traced train step registers a `CustomGradient-N` (tf.distribute's all-reduce)
    in a global registry that is never emptied, and it holds the whole traced graph: about
    10 MB per trial that `clear_session` does not free. A trial's model is done with
    them once its training has ended.
    """
    registry = _gradients()
    if registry is None:
        return
    for name in [n for n in registry if n not in before and n.startswith("CustomGradient-")]:
        del registry[name]
