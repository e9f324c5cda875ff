"""``train.report_to``: experiment tracking through the HF Trainer's own integrations.

    with tracker_environment(recipe, is_main=True):
        trainer.train()

The Trainer's callbacks do the logging (``TensorBoardCallback``, ``WandbCallback``, ...); pmod
adds its efficiency figures to every logged step (``throughput.py``) and sets up where and how:

- tensorboard: event files under ``<output_dir>/runs/<date>_<host>/`` (the Trainer's default;
  ``TENSORBOARD_LOGGING_DIR`` moves them);
- wandb: the run's files under ``<output_dir>/wandb/`` (unless ``WANDB_DIR`` is set), project
  ``pmod`` (unless ``WANDB_PROJECT``), and offline (``WANDB_MODE=offline``) when the wandb server
  cannot be reached or no API key is set, so that training never waits on the network; ``wandb
  sync <output_dir>/wandb/offline-run-*`` uploads it later. A ``WANDB_MODE`` already set wins.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import netrc
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError
from .recipe import Recipe

logger = logging.getLogger(__name__)

# the package each tracker needs, and how to install it
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
WANDB_SERVER = "https://api.wandb.ai"
CONNECT_TIMEOUT_S = 3.0


def trackers(recipe: Recipe) -> list[str]:
    """The recipe's ``train.report_to`` as a list (empty for none)."""
    report_to = recipe.train.report_to
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in names if name != "none"]


def check_trackers(recipe: Recipe) -> None:
    """A UserError for a tracker whose package is not installed (before anything is built)."""
    for name in trackers(recipe):
        module, package = TRACKER_PACKAGES.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(
                f"train.report_to = {name!r} needs the {package} package: pip install {package} "
                "(or pip install 'pmod-cli[track]')"
            )


def wandb_can_log_online() -> tuple[bool, str]:
    """(whether wandb can reach its server with an API key, why not)."""
    url = os.environ.get("WANDB_BASE_URL", WANDB_SERVER)
    host = urlparse(url).hostname or url
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        return False, f"no wandb API key (WANDB_API_KEY or `wandb login`) for {host}"
    port = urlparse(url).port or (80 if url.startswith("http://") else 443)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return False, f"{host} cannot be reached ({err.strerror or type(err).__name__})"
    return True, ""


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@contextlib.contextmanager
def tracker_environment(recipe: Recipe, is_main: bool) -> Iterator[dict[str, str]]:
    """The environment the trackers read, set for the block and restored after it; yields what
    it set."""
    wanted: dict[str, str] = {}
    if "wandb" in trackers(recipe):
        wanted["WANDB_DIR"] = str(Path(recipe.train.output_dir).resolve())
        wanted["WANDB_PROJECT"] = "pmod"
        if is_main and "WANDB_MODE" not in os.environ:
            online, why = wandb_can_log_online()
            if not online:
                wanted["WANDB_MODE"] = "offline"
                logger.warning(
                    "wandb logs offline: %s; upload the run later with "
                    "wandb sync %s/wandb/offline-run-*",
                    why,
                    wanted["WANDB_DIR"],
                )
    applied = {key: value for key, value in wanted.items() if key not in os.environ}
    if "WANDB_DIR" in applied:
        Path(applied["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(applied)
    try:
        yield applied
    finally:
        if "wandb" in trackers(recipe) and is_main:
            _finish_wandb_run()
        for key in applied:
            os.environ.pop(key, None)


def _finish_wandb_run() -> None:
    """Close the run the Trainer's callback opened (it leaves that to the process's exit), so a
    second stage in the same process starts its own."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
