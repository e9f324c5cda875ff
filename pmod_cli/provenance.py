"""Where a report came from, for scripts that compare reports (``eval.json``, ``pmod flops --json``).

Every such report starts with the same header: its ``schema_version`` (raised when a field
changes meaning or goes away), the versions of the packages that produced it, a UTC timestamp
and the command line. Versions are read from the installed packages' metadata, so the header
costs no import of torch or lmms-eval.
"""

from __future__ import annotations

import shlex
import sys
from datetime import UTC, datetime
from importlib import metadata

from . import __version__

# report key -> distribution name
PACKAGES = {"torch": "torch", "transformers": "transformers", "lmms_eval": "lmms_eval"}


def package_versions() -> dict[str, str | None]:
    """pmod's version and the installed torch, transformers and lmms-eval (None: not installed)."""
    versions: dict[str, str | None] = {
        "pmod": __version__
    }  # the code running, also from a checkout
    for key, distribution in PACKAGES.items():
        try:
            versions[key] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def command_line() -> str:
    """The command as it can be typed again (the ``pmod`` command line sets ``argv[0]`` to ``pmod``)."""
    return shlex.join(sys.argv)


def report_header(schema_version: int) -> dict:
    """The first keys of a report: schema version, package versions, UTC time, command line."""
    return {
        "schema_version": schema_version,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command_line(),
        "versions": package_versions(),
    }
