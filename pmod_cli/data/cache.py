"""Cached directories built once and shared by concurrent processes (the ranks of a torchrun).

    path = build_once(final, is_complete=lambda p: (p / "VERSION").is_file(), build=write_files)

The first process to get the lock builds into a temporary directory next to ``final`` and renames
it into place; the others wait for the lock, then find the complete copy and use it. Without the
lock (a filesystem that has none) every process builds, and the rename protocol alone keeps them
safe: a complete copy in place is never removed or replaced, a late builder discards its own copy,
and an old or partial copy is renamed aside before it is removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def has_version(directory: Path, version: object) -> bool:
    """Whether ``directory`` holds a ``VERSION`` file that says ``version`` (a build of it is done)."""
    version_file = Path(directory) / "VERSION"
    return version_file.is_file() and version_file.read_text().strip() == str(version)


def build_once(
    final: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], object]
) -> Path:
    """``final``, built by ``build(directory)`` unless a complete copy is already there."""
    final = Path(final)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(final):
        if is_complete(final):  # another process built it while this one waited
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(staging)
            staging.chmod(0o755)  # mkdtemp makes it private
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish(staging, final, is_complete)
    return final


def publish(staging: Path, final: Path, is_complete: Callable[[Path], bool]) -> None:
    """Move the built ``staging`` directory to ``final``; never removes a complete copy."""
    if is_complete(final):  # another process got there first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
        return
    aside = None
    if final.exists():  # an older version, or a crashed partial copy
        aside = final.parent / f".{final.name}-old-{os.getpid()}-{staging.name}"
        try:
            os.rename(final, aside)
        except FileNotFoundError:  # another process moved it first
            aside = None
    try:
        os.rename(staging, final)
    except (
        OSError
    ):  # another process renamed its copy in first (a rename never replaces a full directory)
        shutil.rmtree(staging, ignore_errors=True)
    if aside is not None and not is_complete(aside):
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``.<name>.lock`` next to ``final``, where the system has locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename protocol alone
        yield
        return
    with open(final.parent / f".{final.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks
            locked = False
        else:
            locked = True
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)
