"""One loader for every command: a checkpoint directory (p-MoD or plain HF LLaVA) to model + processor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..errors import UserError
from .config import PMoDConfig
from .modeling import apply_pmod

DENSE_TYPES = ("llava", "llava_next")
PMOD_TYPES = ("pmod_llava", "pmod_llava_next")


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
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {config_file}: {err}") from None
    if model_type not in DENSE_TYPES + PMOD_TYPES:
        raise UserError(
            f"{path} holds a {model_type!r} model; pmod works with {', '.join(DENSE_TYPES + PMOD_TYPES)} checkpoints"
        )
    return model_type


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    pmod: PMoDConfig | None = None,
):
    """Load ``(model, processor)`` from a p-MoD or dense LLaVA / LLaVA-NeXT directory, in eval mode.

    ``pmod`` converts a dense checkpoint on load (or re-plans a p-MoD one).
    """
    read_model_type(path)
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
        processor = AutoProcessor.from_pretrained(str(path))
    except OSError as err:
        raise UserError(
            f"cannot load the checkpoint in {path}: {str(err).splitlines()[0]}"
        ) from None
    if pmod is not None:
        apply_pmod(model, pmod)
    return model.to(device).eval(), processor


def convert_checkpoint(source: str | Path, destination: str | Path, config: PMoDConfig) -> Path:
    """Write a p-MoD copy of a LLaVA / LLaVA-NeXT checkpoint (fresh routers) to ``destination``."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise UserError(f"{destination} exists and is not empty; choose a new output directory")
    model, processor = load_checkpoint(source, pmod=config)
    staging = destination.with_name(destination.name + ".partial")
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    if destination.exists():
        destination.rmdir()
    staging.rename(destination)  # the directory appears whole or not at all
    return destination
