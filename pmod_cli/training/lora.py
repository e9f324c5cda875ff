"""LoRA and QLoRA through PEFT: adapters on the language model, the rest as a recipe trains it.

    model = add_lora(model, recipe.lora, gradient_checkpointing=False)   # a peft.PeftModel
    write_adapter(model, directory, model.state_dict(), info)           # checkpoint-N
    write_merged(model, directory, state_dict, processor)              # the final model

``[lora]`` puts a LoRA adapter on the language model's linear layers (``targets``: all of them,
or some by name), never on a p-MoD router: a router is a new ``Linear(hidden, 1)`` that starts
at zero, so a low-rank update of its frozen zero weight could only learn through the adapter;
routers train in full instead, with the connector (and the vision tower if it is tuned). QLoRA
loads the language model's linear layers in 4-bit NF4 (bitsandbytes, on CUDA) under the adapters.

Saving (``model.adapters`` describes the adapter directory):

- a checkpoint (``checkpoint-N``) is an adapter directory: PEFT's adapter, the parts trained in
  full, the base it goes on;
- the final model is by default *merged*: each adapted weight becomes W + (alpha / r) B A (4-bit
  weights dequantized first) and the model is saved as an ordinary HF-native checkpoint, with
  ``lora.save = "adapter"`` the adapter directory alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.tiny import resolve_name
from ..errors import UserError
from ..model.adapters import ADAPTER_INFO_FILE, FULL_WEIGHTS_FILE, AdapterInfo
from ..model.router import Router
from .recipe import LoraSection, Recipe

# imported where used: peft (the train extra) and bitsandbytes (the qlora extra)

PEFT_PREFIX = "base_model.model."  # what PEFT puts in front of the wrapped model's names
ADAPTER_NAME = "default"


def is_lora_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap_lora(model: nn.Module) -> nn.Module:
    """The HF model inside a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if is_lora_model(model) else model


def lora_target_names(model: nn.Module, lora: LoraSection) -> list[str]:
    """Full names of the language model's linear layers that get an adapter (never a router)."""
    text_model = model.model.language_model
    wanted = lora.target_names
    found, names = set(), []
    for name, module in text_model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, Router):
            continue
        short = name.rsplit(".", 1)[-1]
        found.add(short)
        if wanted is None or short in wanted:
            names.append(f"model.language_model.{name}")
    missing = sorted(set(wanted or ()) - found)
    if missing or not names:
        raise UserError(
            f"lora.targets names {', '.join(missing) or 'no layer'}, which the language model does not "
            f'have; its linear layers are {", ".join(sorted(found))} (or use "all-linear")'
        )
    return names


def check_stage(recipe: Recipe, stage: str) -> None:
    """``[lora]`` is an sft setting: pretrain trains the connector alone."""
    if recipe.lora.enabled and stage == "pretrain":
        raise UserError(
            "[lora] trains adapters of the language model in sft; pretrain trains the connector "
            "alone: set lora.enabled = false for pretrain"
        )


def describe(lora: LoraSection, adapted_layers: int) -> str:
    """One line on a run's adapters, for the plan."""
    targets = "all linear layers" if lora.target_names is None else ", ".join(lora.target_names)
    return (
        f"r {lora.r}, alpha {lora.alpha:g} (scale {lora.alpha / lora.r:g}), dropout {lora.dropout:g} "
        f"on {adapted_layers} layers ({targets}){', 4-bit NF4 base (QLoRA)' if lora.qlora else ''}; "
        f"final model {lora.save}"
    )


def quantization_config():
    """bitsandbytes 4-bit NF4 (double quantization, bf16 compute where the GPU has it), for the
    language model only; a UserError where it cannot run."""
    if not torch.cuda.is_available():
        raise UserError(
            "lora.qlora loads the language model in 4-bit with bitsandbytes, which needs a CUDA GPU "
            "and torch sees none here; set lora.qlora = false to train LoRA adapters on the "
            "full-precision model"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "lora.qlora needs the bitsandbytes package: pip install 'pmod-cli[qlora]'"
        ) from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        # the tower, the connector and the output layer keep their precision
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
    )


def add_lora(model: nn.Module, lora: LoraSection, gradient_checkpointing: bool) -> nn.Module:
    """``model`` wrapped by PEFT with a LoRA adapter on its ``lora.targets`` (all frozen but
    the adapters: ``build.set_trainable`` then unfreezes the parts trained in full)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_names(model, lora),
        bias="none",
    )
    with warnings.catch_warnings():  # PEFT asks transformers' deprecated checkpointing flag
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        if lora.qlora:  # norms in fp32, inputs that carry gradients through the 4-bit layers
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        return get_peft_model(model, config)


def adapted_layers(model: nn.Module) -> int:
    """How many layers carry an adapter."""
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(module, LoraLayer) for module in model.modules())


def adapter_info(recipe: Recipe, model: nn.Module) -> AdapterInfo:
    """What ``pmod_adapter.json`` says about a run's adapters."""
    base_model = unwrap_lora(model)
    checkpoint = recipe.model.checkpoint
    base = None
    if checkpoint:
        base = resolve_name(checkpoint)
        base = str(Path(base).resolve()) if Path(base).exists() else base  # a path, or a hub id
    pmod = base_model.config.pmod if getattr(base_model.config, "pmod", None) else None
    return AdapterInfo(
        base=base,
        built_from=checkpoint or f"{recipe.model.vision_tower} + {recipe.model.llm}",
        # the class's: a config loaded from a dense checkpoint keeps "llava" as an attribute
        model_type=type(base_model.config).model_type,
        num_layers=base_model.config.text_config.num_hidden_layers,
        pmod=pmod,
    )


def full_trained_names(model: nn.Module) -> list[str]:
    """The trainable parameters that are not adapters (PEFT's names): the parts trained in full."""
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and ".lora_" not in name
    ]


def write_adapter(
    model: nn.Module,
    directory: str | Path,
    state_dict: dict[str, torch.Tensor],
    info: AdapterInfo,
    full_names: list[str],
) -> None:
    """An adapter directory (without the processor) from a state dict of the PEFT model (a
    DeepSpeed ZeRO-3 save gathers only the trainable tensors: enough here)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    model.save_pretrained(str(directory), state_dict=state_dict)  # PEFT picks the adapter's tensors
    full = {
        name.removeprefix(PEFT_PREFIX): state_dict[name].detach().cpu().contiguous()
        for name in full_names
    }
    save_file(full, str(directory / FULL_WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / ADAPTER_INFO_FILE).write_text(info.to_json())


def merged_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The HF model's state dict with each adapter merged: W + scaling * (B @ A), computed in
    fp32 and stored in W's dtype; 4-bit weights (QLoRA) are dequantized first, from the live
    model. ``state_dict``: the PEFT model's, complete (gathered under ZeRO-3)."""
    from peft.tuners.lora import LoraLayer

    adapted = {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    dequantized = _dequantized_weights(unwrap_lora(model))
    merged: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_" in name or _is_quantization_state(name, dequantized):
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and owner.removesuffix(".base_layer") in adapted:
            owner = owner.removesuffix(".base_layer")
            name = f"{owner}.{leaf}"
        tensor = dequantized.get(name, tensor)
        if leaf == "weight" and owner in adapted:
            tensor = _merge(tensor, adapted[owner], state_dict, owner)
        merged[name] = tensor
    return merged


def _merge(weight: torch.Tensor, layer, state_dict: dict, owner: str) -> torch.Tensor:
    lora_a = state_dict[f"{PEFT_PREFIX}{owner}.lora_A.{ADAPTER_NAME}.weight"].float()  # (r, in)
    lora_b = state_dict[f"{PEFT_PREFIX}{owner}.lora_B.{ADAPTER_NAME}.weight"].float()  # (out, r)
    delta = (lora_b @ lora_a) * layer.scaling[ADAPTER_NAME]  # (out, in)
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def _dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer>.weight": its dequantized weight} for every 4-bit bitsandbytes layer (QLoRA)."""
    weights = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is None:
            continue
        from peft.utils.integrations import dequantize_bnb_weight

        owner = name.removesuffix(".base_layer")
        dtype = weight.quant_state.dtype
        weights[f"{owner}.weight"] = dequantize_bnb_weight(weight, state=weight.quant_state).to(
            dtype
        )
    return weights


def _is_quantization_state(name: str, dequantized: dict[str, torch.Tensor]) -> bool:
    """bitsandbytes' extra state-dict entries of a 4-bit weight ("...weight.absmax", ...)."""
    owner, separator, _ = name.partition(".weight.")
    return bool(separator) and f"{owner.removesuffix('.base_layer')}.weight" in dequantized


def write_merged(
    model: nn.Module, directory: str | Path, state_dict: dict[str, torch.Tensor], processor
) -> None:
    """The final model with its adapters merged in, as an ordinary HF-native checkpoint."""
    base = unwrap_lora(model)
    base.save_pretrained(str(directory), state_dict=merged_state_dict(model, state_dict))
    processor.save_pretrained(str(directory))
