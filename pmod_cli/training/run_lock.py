"""One training run per output directory: a lock file naming the run that holds it.

    lock = RunLock(output_dir)
    lock.acquire()     # a UserError naming the holder (pid, host, start) if another run is live
    ...                # train
    lock.release()

The lock is ``<output_dir>/.pmod-run.lock``, held with ``flock`` for the life of the process
that took it and holding that process's pid, host, start time and command line (JSON). The
kernel drops a ``flock`` when its process dies, however it dies, so a lock file that nobody
holds was left by a run that is gone: the next run takes it over and says so in a warning.
On a filesystem without ``flock`` the pid decides: a pid that no longer runs on this host is
gone; one on another host cannot be checked from here and refuses, naming the file to delete.

Only one process of a multi-process run (rank 0) takes the lock; the other ranks are part of
the same run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".pmod-run.lock"


@dataclass
class LockHolder:
    pid: int
    host: str
    started: str  # local time, ISO 8601
    command: str

    def describe(self) -> str:
        command = self.command if len(self.command) <= 120 else self.command[:117] + "..."
        return f"pid {self.pid} on {self.host}, started {self.started} ({command})"


def _this_run() -> LockHolder:
    return LockHolder(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=" ".join([_program(), *sys.argv[1:]])[:300],
    )


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "pmod" if name == "__main__.py" else name


def _read_holder(text: str) -> LockHolder | None:
    try:
        values = json.loads(text)
        return LockHolder(
            int(values["pid"]), str(values["host"]), str(values["started"]), str(values["command"])
        )
    except (ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """The lock on one output directory (see the module docstring)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._handle = None
        self._created_dir = False

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> None:
        """Take the lock, or raise a UserError naming the live run that holds it."""
        self._created_dir = not self.output_dir.exists()
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot create train.output_dir {self.output_dir}: {err.strerror or err}"
            ) from None
        for _ in range(10):  # retried only when another process replaced the file meanwhile
            try:
                handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
            except OSError as err:
                raise UserError(
                    f"cannot write in train.output_dir {self.output_dir}: {err.strerror or err}"
                ) from None
            try:
                locked = self._lock(handle)
                if locked and not self._same_file(handle):
                    continue  # the file was released (removed) between our open and our lock
                handle.seek(0)
                previous = handle.read()
                if locked is False:
                    raise self._in_use(previous)
                if locked is None:  # no flock here: the pid in the file decides
                    self._refuse_if_live(previous)
                self._take(handle, previous)
                return
            finally:
                if self._handle is not handle:
                    handle.close()
        raise UserError(
            f"cannot take the lock {self.path}: other runs keep replacing it; try again"
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (only the holder calls this)."""
        if self._handle is None:
            return
        try:
            if self._same_file(self._handle):
                self.path.unlink()
        except OSError:
            pass
        finally:
            self._handle.close()  # closing drops the flock
            self._handle = None
        if self._created_dir:  # a run that stopped before writing anything leaves no empty folder
            try:
                self.output_dir.rmdir()
            except OSError:
                pass

    def live_holder(self) -> LockHolder | None:
        """The run that seems to hold the lock now, judged by its pid (a dry run takes nothing)."""
        try:
            holder = _read_holder(self.path.read_text(encoding="utf-8"))
        except OSError:
            return None
        if holder is None or (holder.host == socket.gethostname() and not _pid_alive(holder.pid)):
            return None
        return holder

    # ---- pieces --------------------------------------------------------------------------

    def _lock(self, handle) -> bool | None:
        """True: locked; False: another process holds it; None: the filesystem has no flock."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        return True

    def _same_file(self, handle) -> bool:
        try:
            return os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _in_use(self, text: str) -> UserError:
        holder = _read_holder(text)
        who = (
            holder.describe()
            if holder is not None
            else f"its lock file {self.path} is still being written"
        )
        return UserError(
            f"{self.output_dir} is in use by another run: {who}; wait for it to end or choose another "
            "train.output_dir"
        )

    def _refuse_if_live(self, text: str) -> None:
        holder = _read_holder(text)
        if holder is None or holder.pid == os.getpid():
            return
        if holder.host != socket.gethostname():
            raise UserError(
                f"{self.output_dir} is in use by another run: {holder.describe()}; this host cannot tell whether "
                f"it still runs: if it is gone, delete {self.path}, else choose another train.output_dir"
            )
        if _pid_alive(holder.pid):
            raise self._in_use(text)

    def _take(self, handle, previous: str) -> None:
        holder = _read_holder(previous)
        if holder is not None and holder.pid != os.getpid():
            logger.warning(
                "taking over %s, left by a run that is no longer running (%s)",
                self.path,
                holder.describe(),
            )
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(asdict(_this_run())))
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle
