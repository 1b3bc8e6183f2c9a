"""nas: neural architecture search for Keras (declared CNN spaces, KerasTuner, MLflow).

This module only re-exports the public API, lazily: `import nas` stays instant and pulls
in TensorFlow or MLflow only when a name that needs them is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SpecError": "nas.specs", "SearchSpace": "nas.specs", "Pipeline": "nas.specs",
    "Constraints": "nas.specs", "load_space": "nas.specs", "load_pipeline": "nas.specs",
    "Architecture": "nas.architecture",
    "NasError": "nas.errors", "InputError": "nas.errors", "SearchError": "nas.errors",
    "DataError": "nas.errors", "SearchFailed": "nas.errors",
    "SearchConfig": "nas.settings", "Budget": "nas.settings", "FinalModel": "nas.settings",
    "ScaleOut": "nas.settings", "prepare": "nas.search", "run": "nas.search",
    "Callback": "nas.events", "EpochEnded": "nas.events", "TrialEnded": "nas.events",
    "TrackingError": "nas.tracking",
    "ResultsError": "nas.results",
    "ExportError": "nas.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nas' has no attribute {name!r}")
