"""Checkpoint formats pmod reads, and their translation into llava-hf's.

    fmt = detect_format("llava-v1.5-7b/")            # "original_llava"
    imported = import_checkpoint("p-MoD-LLaVA-NeXT-7B/", vision_tower="clip-vit-large-patch14-336/")
    imported.config, imported.state_dict, imported.processor, imported.pmod, imported.routers

Formats:

- ``llava_hf``: an HF LLaVA / LLaVA-NeXT directory (``llava``, ``llava_next``) or pmod's own
  (``pmod_llava``, ``pmod_llava_next``); read as it is, nothing to translate.
- ``original_llava``: haotian-liu/LLaVA's format (``llava_llama``, ``llava_mistral``,
  ``llava_qwen``; ``original_llava.py``).
- ``official_pmod``: the paper's released code (``pmod_llava_llama``; ``official_pmod.py``).

A translation gives what an HF LLaVA model is built from (config, weights under llava-hf's
module names, processor) and, for official p-MoD, the ``PMoDConfig`` and the routers' weights;
building the model is the loader's job (``pmod_cli.model.loading``). Nothing here writes a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import UserError
from ..config import PMoDConfig
from ..families import IMAGE_TOKEN, get_family, known_model_types
from ..weights import read_weights
from . import official_pmod, original_llava

ORIGINAL_TYPES = ("llava_llama", "llava_mistral", "llava_qwen")
OFFICIAL_TYPES = ("pmod_llava_llama",)


def read_config(path: str | Path) -> dict[str, Any]:
    """A checkpoint directory's config.json as a dict; a UserError if there is none."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        values = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {config_file}: {err}") from None
    if not isinstance(values, dict):
        raise UserError(f"{config_file} is not a JSON object")
    return values


def detect_format(path: str | Path) -> str:
    """``llava_hf``, ``original_llava`` or ``official_pmod``; a UserError for anything else."""
    values = read_config(path)
    model_type = values.get("model_type")
    # the original format keeps the tower's name in the config (the oldest one says "llava" too)
    if "mm_vision_tower" in values or model_type in ORIGINAL_TYPES + OFFICIAL_TYPES:
        return "official_pmod" if official_pmod.is_official_pmod(values) else "original_llava"
    if model_type in known_model_types():  # HF-native: a registered family, dense or p-MoD
        return "llava_hf"
    raise UserError(
        f"{path} holds a {model_type!r} model in no format pmod reads: HF-native ({', '.join(known_model_types())}), "
        f"original LLaVA ({', '.join(ORIGINAL_TYPES)}) or official p-MoD ({', '.join(OFFICIAL_TYPES)})"
    )


@dataclass
class ForeignCheckpoint:
    """An original LLaVA or official p-MoD checkpoint, checked, before any weight is read."""

    path: Path
    format: str  # "original_llava" | "official_pmod"
    values: dict[str, Any]  # its config.json
    layout: original_llava.OriginalLayout
    pmod: PMoDConfig | None  # official p-MoD: the settings it was trained with

    @property
    def num_layers(self) -> int:
        return int(self.values["num_hidden_layers"])

    @property
    def hf_model_type(self) -> str:
        """The llava-hf (or pmod) model type it becomes."""
        family = get_family(self.layout.layout)
        return family.pmod_model_type if self.pmod is not None else family.dense_model_type


def inspect_checkpoint(
    path: str | Path, vision_tower: str | Path | None = None
) -> ForeignCheckpoint:
    """Check a foreign checkpoint's config and find its vision tower; reads no weights."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "llava_hf":
        raise ValueError(f"{path} is a llava-hf checkpoint: load it as it is")
    values = read_config(path)
    layout = original_llava.read_layout(values, path, vision_tower)
    pmod = (
        official_pmod.pmod_config(values, layout.layout, path) if fmt == "official_pmod" else None
    )
    if "num_hidden_layers" not in values or "vocab_size" not in values:
        raise UserError(f"{path / 'config.json'} lacks num_hidden_layers or vocab_size")
    if pmod is not None:
        _check_listed_layers(values, pmod, path)
    return ForeignCheckpoint(path=path, format=fmt, values=values, layout=layout, pmod=pmod)


def _check_listed_layers(values: dict[str, Any], pmod: PMoDConfig, path: Path) -> None:
    # the released code writes the MoD layers it built into the config it saves
    listed = values.get("mod_target_layer_indices")
    ratios = pmod.retention_ratios(int(values["num_hidden_layers"]))
    planned = [i for i, ratio in enumerate(ratios) if ratio < 1.0]
    if listed is not None and list(listed) != planned:
        raise UserError(
            f"{path}: mod_target_layer_indices {listed} differ from the layers its settings give, {planned}"
        )


@dataclass
class ImportedCheckpoint:
    """A foreign checkpoint in llava-hf's terms: what ``from_pretrained(None, config=, state_dict=)``
    needs, the processor, and the p-MoD part (settings and routers) of an official checkpoint."""

    source: ForeignCheckpoint
    config: Any  # transformers LlavaConfig | LlavaNextConfig (dense)
    state_dict: dict[str, torch.Tensor]  # llava-hf module names, one dtype
    processor: Any  # LlavaProcessor | LlavaNextProcessor
    routers: dict[int, dict[str, torch.Tensor]] = field(
        default_factory=dict
    )  # layer -> weight, bias

    @property
    def pmod(self) -> PMoDConfig | None:
        return self.source.pmod


def import_checkpoint(
    path: str | Path, vision_tower: str | Path | None = None, dtype: torch.dtype | None = None
) -> ImportedCheckpoint:
    """Read and translate an original LLaVA or official p-MoD checkpoint (see the module doc).

    ``dtype`` defaults to that of the checkpoint's language model; the tower is cast to it.
    """
    source = inspect_checkpoint(path, vision_tower)
    weights = read_weights(source.path)
    routers = {}
    if source.pmod is not None:
        bias_enabled = bool(source.values.get("mod_bias_enabled", True))
        weights, routers = official_pmod.unwrap_mod_layers(weights, bias_enabled, source.path)
        official_pmod.check_router_layers(routers, source.pmod, source.num_layers, source.path)
    hf_weights, checkpoint_tower = original_llava.split_weights(weights)
    del weights
    tower, base_image_processor = original_llava.load_tower(source.layout)
    original_llava.check_projector_input(
        hf_weights, tower.config.hidden_size, source.layout.vision_tower, source.path
    )
    hf_weights.update(
        original_llava.tower_weights_for_llava(
            tower, checkpoint_tower, source.layout.tower_from_checkpoint, source.path
        )
    )
    tokenizer, vocab_size = original_llava.load_tokenizer(
        source.path, int(source.values["vocab_size"])
    )
    original_llava.grow_vocabulary(hf_weights, vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = original_llava.build_config(
        source.values, source.layout, tower.config, vocab_size, image_token_id
    )
    processor = original_llava.build_processor(
        source.layout, tokenizer, base_image_processor, tower.config
    )
    target = dtype or _text_dtype(hf_weights)
    hf_weights = {
        name: tensor.to(target) if tensor.is_floating_point() else tensor
        for name, tensor in hf_weights.items()
    }
    routers = {i: {k: t.to(target) for k, t in r.items()} for i, r in routers.items()}
    return ImportedCheckpoint(
        source=source, config=config, state_dict=hf_weights, processor=processor, routers=routers
    )


def _text_dtype(weights: dict[str, torch.Tensor]) -> torch.dtype:
    embeddings = weights.get("model.language_model.embed_tokens.weight")
    return embeddings.dtype if embeddings is not None else torch.float32
