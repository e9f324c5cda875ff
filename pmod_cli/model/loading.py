"""One loader for every command: a checkpoint directory to model + processor.

It reads llava-hf directories (dense LLaVA / LLaVA-NeXT or p-MoD) as they are, and original
LLaVA and official p-MoD checkpoints through ``model.formats``, translated in memory (their
vision tower must then be a local directory: the config's ``mm_vision_tower`` or
``vision_tower=``). ``convert_checkpoint`` writes any of them as an HF-native directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from ..errors import UserError
from .config import PMoDConfig
from .formats import detect_format, import_checkpoint, inspect_checkpoint, read_config
from .modeling import apply_pmod, mod_layer_indices

DENSE_TYPES = ("llava", "llava_next")
PMOD_TYPES = ("pmod_llava", "pmod_llava_next")
_DENSE_CLASSES = {
    LlavaConfig: LlavaForConditionalGeneration,
    LlavaNextConfig: LlavaNextForConditionalGeneration,
}


def read_model_type(path: str | Path, vision_tower: str | Path | None = None) -> str:
    """The ``model_type`` the checkpoint loads as (``llava``, ``llava_next``, ``pmod_llava``,
    ``pmod_llava_next``); a UserError if the directory is unusable. A foreign checkpoint is
    checked as far as it can be without its weights (its settings and its vision tower)."""
    if detect_format(path) == "llava_hf":
        return read_config(path).get("model_type")
    return inspect_checkpoint(path, vision_tower).hf_model_type


def read_num_layers(path: str | Path, vision_tower: str | Path | None = None) -> int:
    """The number of decoder layers of a checkpoint in any format pmod reads (no weights loaded)."""
    if detect_format(path) == "llava_hf":
        try:
            return AutoConfig.from_pretrained(str(path)).text_config.num_hidden_layers
        except (OSError, ValueError) as err:
            raise UserError(
                f"cannot read the config of {path}: {str(err).splitlines()[0]}"
            ) from None
    return inspect_checkpoint(path, vision_tower).num_layers


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    pmod: PMoDConfig | None = None,
    vision_tower: str | Path | None = None,
    dense: bool = False,
):
    """Load ``(model, processor)`` from a checkpoint directory in any format pmod reads, in eval mode.

    ``pmod`` converts a dense checkpoint on load (or re-plans a p-MoD one); ``dense`` loads an
    official p-MoD checkpoint without its routers (every layer dense).
    """
    if detect_format(path) == "llava_hf":
        model, processor = _load_llava_hf(Path(path), dtype, attn_implementation)
    else:
        model, processor = _load_foreign(
            Path(path), dtype, attn_implementation, vision_tower, dense
        )
    if pmod is not None:
        apply_pmod(model, pmod)
    return model.to(device).eval(), processor


def _load_llava_hf(path: Path, dtype, attn_implementation):
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
    return model, processor


def _load_foreign(path: Path, dtype, attn_implementation, vision_tower, dense: bool):
    """An original LLaVA / official p-MoD checkpoint as a llava-hf (or p-MoD) model."""
    imported = import_checkpoint(path, vision_tower, dtype)
    model_class = _DENSE_CLASSES[type(imported.config)]
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    _check_weights_fit(model_class, imported.config, imported.state_dict, path)
    model = model_class.from_pretrained(
        None,
        config=imported.config,
        state_dict=imported.state_dict,
        dtype=next(iter(imported.state_dict.values())).dtype,
        **kwargs,
    )
    if imported.pmod is not None and not dense:
        apply_pmod(model, imported.pmod)
        _copy_routers(model, imported.routers)
    return model, imported.processor


def _check_weights_fit(
    model_class, config, state_dict: dict[str, torch.Tensor], path: Path
) -> None:
    """Every weight the model needs, of the shape it needs (checked on a meta-device shell)."""
    with torch.device("meta"):
        expected = {name: tensor.shape for name, tensor in model_class(config).state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in state_dict:
            raise UserError(f"{path}: its weights lack what llava-hf calls {name}")
        if state_dict[name].shape != shape:
            raise UserError(
                f"{path}: {name} is {tuple(state_dict[name].shape)}, but its config makes it {tuple(shape)}"
            )


def _copy_routers(model, routers: dict[int, dict[str, torch.Tensor]]) -> None:
    """The checkpoint's routers into the layers that are MoD (a re-planned layer without one stays fresh)."""
    layers = model.model.language_model.layers
    with torch.no_grad():
        for index in mod_layer_indices(model):
            if index in routers:
                layers[index].router.weight.copy_(
                    routers[index]["weight"].reshape(layers[index].router.weight.shape)
                )
                layers[index].router.bias.copy_(
                    routers[index]["bias"].reshape(layers[index].router.bias.shape)
                )


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    config: PMoDConfig | None = None,
    *,
    overrides: dict | None = None,
    dense: bool = False,
    vision_tower: str | Path | None = None,
) -> Path:
    """Write ``source`` (any format pmod reads) to ``destination`` as an HF-native checkpoint.

    A p-MoD checkpoint by default: ``config`` (fresh routers) for a dense source, an official
    p-MoD checkpoint's own settings and routers otherwise; ``overrides`` change single options of
    either (``{"beta": 0.4}``). ``dense`` writes a plain llava-hf checkpoint instead. Everything
    is read and checked before anything is written; the directory appears whole or not at all.
    """
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UserError(f"{destination} exists and is not empty; choose a new output directory")
    fmt = detect_format(source)
    if dense and (fmt == "llava_hf" or config is not None or overrides):
        raise UserError(
            "--dense writes original LLaVA and official p-MoD checkpoints as plain llava-hf ones, without "
            "p-MoD options; drop --dense or the schedule options"
        )
    model, processor = load_checkpoint(source, vision_tower=vision_tower, dense=dense)
    if not dense:
        base = config or getattr(model, "pmod_config", None) or PMoDConfig()
        apply_pmod(model, base.replace(**(overrides or {})) if overrides else base)
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if destination.exists():
        destination.rmdir()
    staging.rename(destination)  # the directory appears whole or not at all
    return destination
