"""One loader for every command: a checkpoint (p-MoD or plain HF, of any registered family) to
model + processor. ``pmod eval``, ``visualize``, ``arank``, flops calibration, ``convert`` and
training from ``model.checkpoint`` all load through ``load_checkpoint``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..errors import UserError
from .config import PMoDConfig
from .families import family_for_model_type, known_model_types
from .modeling import apply_pmod


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside the
    block: a command's output is its table or answer, and an error stays one line."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_model_type(path: str | Path) -> str:
    """The checkpoint's ``model_type``; a UserError if the directory or its config is unusable."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise UserError(f"checkpoint directory not found: {path}")
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"cannot read {config_file}: {err}") from None
    if model_type not in known_model_types():
        raise UserError(
            f"{path} holds a {model_type!r} model; pmod works with {', '.join(known_model_types())} checkpoints"
        )
    return model_type


def is_hub_id(reference: str) -> bool:
    """``owner/name`` that is not a local path: transformers looks it up on the Hub (or its cache)."""
    return not Path(reference).exists() and reference.count("/") == 1 and not reference.startswith((".", "/"))


def load_checkpoint(
    reference: str | Path,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    pmod: PMoDConfig | None = None,
    require_pmod: bool = False,
):
    """Load ``(model, processor)`` from a checkpoint directory (or a Hub id), in eval mode.

    ``device=None`` picks CUDA when available. ``pmod`` converts a dense checkpoint on load (or
    re-plans a p-MoD one); ``require_pmod`` refuses a dense checkpoint (commands that show routing).
    """
    reference = str(reference)
    if not is_hub_id(reference):
        model_type = read_model_type(reference)
        if require_pmod and model_type not in known_model_types(pmod=True) and pmod is None:
            family = family_for_model_type(model_type)
            raise UserError(
                f"{reference} holds a dense {family.title} model ({model_type!r}), not a p-MoD one "
                f"({family.pmod_model_type!r}); convert it with `pmod convert` or train it with `pmod sft`"
            )
    kwargs = {key: value for key, value in (("dtype", dtype), ("attn_implementation", attn_implementation)) if value}
    try:
        processor = AutoProcessor.from_pretrained(reference)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load the processor of {reference} ({_first_line(err)}); save it next to the model "
            "with processor.save_pretrained"
        ) from None
    try:
        with quiet_progress_bars():
            model = AutoModelForImageTextToText.from_pretrained(reference, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load the checkpoint in {reference}: {_first_line(err)}") from None
    if pmod is not None:
        apply_pmod(model, pmod)
    return model.to(device or default_device()).eval(), processor


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def convert_checkpoint(source: str | Path, destination: str | Path, config: PMoDConfig) -> Path:
    """Write a p-MoD copy of a checkpoint of any registered family (fresh routers) to ``destination``."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise UserError(f"{destination} exists and is not empty; choose a new output directory")
    model, processor = load_checkpoint(source, pmod=config)
    staging = destination.with_name(destination.name + ".partial")
    with quiet_progress_bars():
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    if destination.exists():
        destination.rmdir()
    staging.rename(destination)  # the directory appears whole or not at all
    return destination
