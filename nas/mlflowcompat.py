"""MLflow internals we touch, checked against mlflow 3.17.2.

The private names used: `mlflow.tracking._tracking_service.utils._tracking_uri` (the URI
`mlflow.set_tracking_uri` last set, read to put it back) and
`mlflow.utils.requirements_utils._init_modules_to_packages_map` (built ahead, in the
background). MLflow's tables, read directly by the fast reader, are fenced on their own
(`nas.mlflow_sqlite`).

Imports MLflow only when a function is called.
"""

from __future__ import annotations

CHECKED_AGAINST = "3.17.2"


def set_tracking_uri() -> str | None:
    """The URI `mlflow.set_tracking_uri` last set in this process; None when none was
    (`mlflow.get_tracking_uri` then falls back to MLFLOW_TRACKING_URI or the default)."""
    from mlflow.tracking._tracking_service import utils

    return utils._tracking_uri


def map_packages() -> None:
    """Build MLflow's map of installed modules to packages (~0.6 s, then cached), which
    `log_model` needs to check a model's pip requirements. Where it has moved, nothing:
    logging a model builds it anyway."""
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()
    except Exception:  # only a head start
        pass
