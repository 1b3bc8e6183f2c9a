"""MLflow's SQLite tables read with `sqlite3`: the fast path of `nas trials`, fenced.

A `Reader` (see `nas.reader`) on a local SQLite tracking store that reads MLflow's private
tables (`experiments`, `runs`, `tags`, `params`, `latest_metrics`, `alembic_version`)
read-only, without importing MLflow. Each query is the one MLflow's SQLAlchemy store runs
for the same call (filters, order and tie-breaks, limits), so the answers are MLflow's, in
MLflow's order; `tests/test_fast_reader.py` holds the two readers against each other.

Checked against MLflow 3.17.2, whose migration scripts end at schema revision
dc11669786a5. A store is read here only at the revision the installed MLflow's scripts
end at (`_schema_head`; MLflow itself refuses any other); another revision, MLflow's
workspaces, or any sqlite3 error, and the caller's MLflow reader answers instead. A later
MLflow whose migrations change these tables needs the queries checked again: a column
gone fails as an sqlite3 error (MLflow answers), but a changed meaning would not, and
`tests/test_fast_reader.py` is what notices.

Why it earns its keep: importing MLflow costs seconds, far longer than the rest of
`nas trials`. On a store of one search of 12 trials (2 shared cores, MLflow 3.17.2),
`nas trials` took 0.16, 0.17 and 0.21 s of wall time with this reader, and 2.35, 2.38 and
2.89 s with the MLflow reader forced: about 14 times as long, the same output.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import re
import sqlite3
import urllib.parse
from typing import TYPE_CHECKING, Callable

from nas.reader import Experiment, Reader, Run
from nas.tracking import TAG_KIND, TAG_SEARCH

if TYPE_CHECKING:
    from nas import tracking

__all__ = ["SqliteReader", "NotADatabase", "NotMlflow", "is_current"]

# The tables the reader reads; a store without one of them is left to MLflow.
_TABLES = {"alembic_version", "experiments", "runs", "tags", "params", "latest_metrics"}


class NotADatabase(Exception):
    """The file is no SQLite database, or a corrupt one; the message is SQLite's."""


class NotMlflow(Exception):
    """The file is an SQLite database without MLflow's tables (MLflow would add its own)."""


def is_current(path: str) -> bool:
    """Whether `SqliteReader` reads the SQLite store at `path` as MLflow would.

    That is, MLflow's tables at the schema version of the installed MLflow (MLflow refuses
    any other), every experiment in the default workspace and MLflow's workspaces off.

    Raises:
        NotADatabase: the file is no SQLite database, or is corrupt.
        NotMlflow: the database holds none of MLflow's tables.
    """
    try:
        with contextlib.closing(_connect(path)) as db:
            tables = {name for (name,) in
                      db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"experiments", "runs"} & tables:
                raise NotMlflow(path)
            if not _TABLES <= tables:
                return False
            head = _schema_head()
            if head is None or \
                    db.execute("SELECT version_num FROM alembic_version").fetchall() != [(head,)]:
                return False
            elsewhere = db.execute("SELECT 1 FROM experiments WHERE workspace IS NOT NULL "
                                   "AND workspace != 'default' LIMIT 1").fetchone()
    except sqlite3.DatabaseError as error:
        if error.sqlite_errorname in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            raise NotADatabase(str(error)) from None
        return False  # locked, say: MLflow waits and retries
    workspaces = os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("true", "1")
    return elsewhere is None and not workspaces


def _or_mlflow(method):
    """Answer from SQLite; after any sqlite3.Error, from MLflow (this call and the next)."""

    @functools.wraps(method)
    def answer(self, *args):
        if self._fallback is None:
            try:
                with contextlib.closing(_connect(self._path)) as db:
                    return method(self, db, *args)
            except sqlite3.Error:
                self._fallback = self._mlflow_reader()
        return getattr(self._fallback, method.__name__)(*args)

    return answer


class SqliteReader(Reader):
    """A local SQLite store at MLflow's current schema (see `is_current`), read-only.

    Args:
        tracking_uri: The store's URI, as the answers name it.
        path: Its SQLite file.
        mlflow_reader: Makes the reader that asks MLflow, on first need: for `tracker`,
            and for every answer after an sqlite3 error.
    """

    _RUN_COLUMNS = "r.run_uuid, r.experiment_id, r.status, r.artifact_uri"
    # MLflow's order: runs without a start time last, then start time, then run id.
    _ORDER = "r.start_time IS NULL, r.start_time {}, r.run_uuid"

    def __init__(self, tracking_uri: str, path: str, mlflow_reader: Callable[[], Reader]):
        self.tracking_uri = tracking_uri
        self._path = path
        self._open_mlflow = mlflow_reader
        self._mlflow = None
        self._fallback = None  # the MLflow reader, once SQLite failed

    @property
    def tracker(self) -> tracking.Tracker:
        return self._mlflow_reader().tracker

    def _mlflow_reader(self) -> Reader:
        if self._mlflow is None:
            self._mlflow = self._open_mlflow()
        return self._mlflow

    @_or_mlflow
    def experiments(self, db) -> list[Experiment]:
        return [Experiment(str(i), name, stage) for i, name, stage in db.execute(
            "SELECT experiment_id, name, lifecycle_stage FROM experiments "
            "WHERE lifecycle_stage = 'active' "
            "ORDER BY creation_time DESC, experiment_id ASC LIMIT 1000")]

    @_or_mlflow
    def experiment(self, db, experiment_id: str) -> Experiment:
        found = self._experiments(db, "experiment_id = ?", int(experiment_id))
        if not found:
            raise sqlite3.DatabaseError(f"no experiment {experiment_id}")  # MLflow says why
        return found[0]

    @_or_mlflow
    def experiment_by_name(self, db, name: str) -> Experiment | None:
        found = self._experiments(db, "name = ?", name)
        return found[0] if found else None

    @_or_mlflow
    def latest_search(self, db, experiment_ids: list[str]) -> Run | None:
        marks = ", ".join("?" * len(experiment_ids))
        runs = self._runs(db, (
            f"SELECT {self._RUN_COLUMNS} FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            f"WHERE t.key = ? AND t.value = 'search' AND r.experiment_id IN ({marks}) "
            f"AND r.lifecycle_stage = 'active' ORDER BY {self._ORDER.format('DESC')} LIMIT 1"),
            (TAG_KIND, *map(int, experiment_ids)))
        return runs[0] if runs else None

    @_or_mlflow
    def run(self, db, run_id: str) -> Run | None:
        runs = self._runs(db, f"SELECT {self._RUN_COLUMNS} FROM runs r WHERE r.run_uuid = ?",
                          (run_id,))
        return runs[0] if runs else None

    @_or_mlflow
    def trial_runs(self, db, experiment_id: str, search_run_id: str) -> list[Run]:
        return self._runs(db, (
            f"SELECT {self._RUN_COLUMNS} FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            f"WHERE t.key = ? AND t.value = ? AND r.experiment_id = ? "
            f"AND r.lifecycle_stage = 'active' ORDER BY {self._ORDER.format('ASC')} "
            f"LIMIT 50000"), (TAG_SEARCH, search_run_id, int(experiment_id)))

    @staticmethod
    def _experiments(db, where: str, value) -> list[Experiment]:
        return [Experiment(str(i), name, stage) for i, name, stage in db.execute(
            f"SELECT experiment_id, name, lifecycle_stage FROM experiments WHERE {where}",
            (value,))]

    @staticmethod
    def _runs(db, query: str, args: tuple) -> list[Run]:
        """The runs `query` selects, each with its tags, params and latest metrics."""
        found = db.execute(query, args).fetchall()
        ids = [row[0] for row in found]
        tags, params, metrics = ({run_id: {} for run_id in ids} for _ in range(3))
        for start in range(0, len(ids), 500):  # within SQLite's limit on bound values
            chunk = ids[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            # Per run in the order rows were written, as MLflow's eager load reads them.
            for table, into in (("tags", tags), ("params", params)):
                for run_id, key, value in db.execute(
                        f"SELECT run_uuid, key, value FROM {table} WHERE run_uuid IN ({marks}) "
                        f"ORDER BY run_uuid, rowid", chunk):
                    into[run_id][key] = value
            for run_id, key, value, is_nan in db.execute(
                    f"SELECT run_uuid, key, value, is_nan FROM latest_metrics "
                    f"WHERE run_uuid IN ({marks}) ORDER BY run_uuid, rowid", chunk):
                metrics[run_id][key] = math.nan if is_nan else float(value)
        return [Run(run_id=run_id, experiment_id=str(experiment_id), status=status,
                    artifact_uri=artifact_uri, tags=tags[run_id], params=params[run_id],
                    metrics=metrics[run_id])
                for run_id, experiment_id, status, artifact_uri in found]


def _connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro",
                           uri=True)


@functools.lru_cache(maxsize=None)
def _schema_head() -> str | None:
    """The schema revision the installed MLflow expects, read from its migration scripts.

    None when they cannot be read: then MLflow itself is asked.
    """
    spec = importlib.util.find_spec("mlflow")  # finds, without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(spec.submodule_search_locations[0], "store", "db_migrations",
                          "versions")
    revisions, parents = set(), set()
    try:
        for entry in os.scandir(folder):
            if entry.name.endswith(".py"):
                with open(entry.path, encoding="utf-8") as f:
                    text = f.read()
                revision = re.search(r"^revision\s*=\s*['\"](\w+)['\"]", text, re.M)
                down = re.search(r"^down_revision\s*=\s*(.+)$", text, re.M)
                if revision:
                    revisions.add(revision.group(1))
                if down:
                    parents.update(re.findall(r"['\"](\w+)['\"]", down.group(1)))
    except OSError:
        return None
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None
