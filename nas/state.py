"""A search's state on disk: one owner at a time, and files that are never half-written.

- `SearchLock`: the lock a running search holds on its working state (`<project>.lock`
  beside the project folder, so that `--overwrite` never deletes a held lock). It is an
  operating-system lock (`fcntl.flock`): the kernel releases it when its process ends,
  however it ends (kill -9 included), so a lock a dead process left is simply taken by
  the next search. The file also says who holds it (host, pid, since when), for the
  refusal.
- `write_atomic`: a file is written aside, flushed to disk and renamed over the old one,
  so a kill -9, a full disk or a power cut leaves the old file or the new, never half of
  one. Every state file of a search is written this way (KerasTuner's too: see
  `nas.ktcompat`).
- `read_json`: a state file read back; one that is empty, truncated or not JSON is a
  `StateError` naming it, never a traceback.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from nas.errors import InputError

__all__ = ["SearchLock", "StateError", "read_json", "write_atomic"]


class StateError(InputError):
    """A search's state cannot be used as it is (held by another process, or unreadable)."""


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` in one step: written aside, flushed, then renamed."""
    path = Path(path)
    aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with open(aside, mode) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(aside, path)
    except BaseException:
        aside.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike):
    """The JSON in `path`.

    Raises:
        StateError: the file is empty, truncated or not JSON (a missing file raises
            FileNotFoundError, as `open` does).
    """
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError:
        shown = "empty" if not text.strip() else "not valid JSON (truncated?)"
        raise StateError(f"{path} is {shown}") from None


class SearchLock:
    """The lock of one search's state, held by one process (a search, or its driver on Ray).

    `check()` refuses at once when another live process holds it, and takes nothing;
    `acquire()` takes it (or refuses the same way); `release()` lets it go.
    """

    def __init__(self, project_dir: str | os.PathLike, experiment: str):
        project_dir = Path(project_dir)
        self.path = project_dir.with_name(project_dir.name + ".lock")
        self.experiment = experiment
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def check(self) -> None:
        """Raise `StateError` if another process holds the lock; take nothing."""
        if self.held or not self.path.exists():
            return
        self.acquire()
        self.release()

    def acquire(self) -> None:
        """Take the lock and say who holds it; `StateError` if another process has it."""
        import fcntl

        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read()
            file.close()
            raise StateError(self._refusal(holder)) from None
        except BaseException:
            file.close()
            raise
        file.seek(0)
        file.truncate()
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                               "since": since}))
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            self._file.seek(0)
            self._file.truncate()  # nobody holds it now
            self._file.flush()
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def _refusal(self, holder: str) -> str:
        try:
            who = json.loads(holder)
            held_by = f"process {who['pid']} on {who['host']} since {who['since']}"
        except (ValueError, KeyError, TypeError):
            held_by = "another process"
        return (f"`experiment`: the search {self.experiment!r} is running in {held_by} "
                f"(lock {self.path}); wait for it to end or stop it, or choose another "
                f"`experiment` or `workdir`")
