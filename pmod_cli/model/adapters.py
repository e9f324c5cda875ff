"""LoRA adapter directories: what ``pmod sft`` with ``[lora]`` writes and the loader reads.

An adapter directory holds the adapter alone, to be put on top of the checkpoint it was trained
from (its *base*):

- ``adapter_config.json`` and ``adapter_model.safetensors``: PEFT's own files (the low-rank
  matrices of the language model's linear layers);
- ``full_weights.safetensors``: the parts trained in full next to the adapters (connector,
  LLaVA-NeXT's image newline, routers; the vision tower if it was tuned), under the model's
  parameter names;
- ``pmod_adapter.json``: the base (a checkpoint directory or hub id; none for a model built from
  parts), the p-MoD settings to convert the base with, and what the result is (model type,
  number of layers);
- the processor and ``recipe.toml``, as in a full checkpoint; no ``config.json``, so it is never
  mistaken for one.

The checkpoints of a LoRA run (``checkpoint-N``) are adapter directories, and so is the final
model with ``lora.save = "adapter"``. ``pmod_cli.model.loading.load_checkpoint`` loads one by
loading its base, converting it, loading the full weights, then PEFT's adapter, merged in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

ADAPTER_INFO_FILE = "pmod_adapter.json"
FULL_WEIGHTS_FILE = "full_weights.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_INFO_FILE, FULL_WEIGHTS_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)
FORMAT = "pmod-lora-adapter"


@dataclass(frozen=True)
class AdapterInfo:
    """The contents of ``pmod_adapter.json``."""

    base: str | None  # the checkpoint the adapter goes on; None: a model built from parts
    built_from: str  # how the trained model was built, for messages
    model_type: str  # what base + adapter make: e.g. "pmod_llava"
    num_layers: int
    pmod: dict[str, Any] | None  # PMoDConfig.to_dict() the base is converted with; None: dense

    def to_json(self) -> str:
        values = {"format": FORMAT, "version": 1, **self.__dict__}
        return json.dumps(values, indent=2) + "\n"


def is_adapter_directory(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_INFO_FILE).is_file()


def read_adapter_info(path: str | Path) -> AdapterInfo:
    """The adapter's ``pmod_adapter.json``; a UserError if it or PEFT's files are unusable."""
    path = Path(path)
    info_file = path / ADAPTER_INFO_FILE
    try:
        values = json.loads(info_file.read_text())
        if values.pop("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        values.pop("version", None)
        info = AdapterInfo(**values)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read the LoRA adapter description {info_file}: {err}") from None
    for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, FULL_WEIGHTS_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path} is a LoRA adapter directory without its {name}")
    return info


def is_hub_id(reference: str) -> bool:
    """``owner/name`` that is not a local path: transformers looks it up on the Hub (or its cache)."""
    return (
        not Path(reference).exists()
        and reference.count("/") == 1
        and not reference.startswith((".", "/"))
    )


def resolve_base(path: str | Path, info: AdapterInfo) -> str:
    """Where the adapter's base is; a UserError naming what to do when there is none."""
    if info.base is None:
        raise UserError(
            f"{path} is a LoRA adapter of a model built from parts ({info.built_from}), which has "
            'no checkpoint to load it on; use the run\'s merged model (lora.save = "merged", the '
            "default) in its train.output_dir"
        )
    if not is_hub_id(info.base) and not Path(info.base).exists():
        raise UserError(
            f"{path} is a LoRA adapter of {info.base}, which is not there any more; put the base "
            f'checkpoint back there (or edit "base" in {Path(path) / ADAPTER_INFO_FILE})'
        )
    return info.base
