"""p-MoD LLaVA and LLaVA-NeXT as ordinary HF models, and ``apply_pmod`` to convert one.

A p-MoD checkpoint has its own ``model_type`` (``pmod_llava``, ``pmod_llava_next``) so it can never
load silently as a dense model; its config carries the ``PMoDConfig`` as ``config.pmod``. The
classes subclass the HF ones, so ``generate``, ``save_pretrained``/``from_pretrained``, the
Trainer and DeepSpeed see a LLaVA model with one small router per MoD layer.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)
from transformers import initialization as init
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

from ..errors import UserError
from .config import PMoDConfig
from .layer import PMoDLayerMixin, RoutingInputs, convert_layer
from .router import Router

SUPPORTED_TEXT_MODELS = ("llama", "qwen2", "mistral")


class PMoDLlavaConfig(LlavaConfig):
    model_type = "pmod_llava"
    pmod: dict | None = None


class PMoDLlavaNextConfig(LlavaNextConfig):
    model_type = "pmod_llava_next"
    pmod: dict | None = None


class PMoDModelMixin:
    """What a p-MoD LLaVA adds to the HF class: routing inputs for its layers, zero-init routers."""

    @property
    def pmod_config(self) -> PMoDConfig:
        return PMoDConfig.from_dict(self.config.pmod or {})

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.language_model.layers

    @property
    def retention_ratios(self) -> list[float]:
        return [layer.pmod_ratio for layer in self.decoder_layers]

    def _init_weights(self, module):
        if isinstance(module, Router):  # a fresh router weighs every token 1
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)

    def _install_routing_hook(self) -> None:
        if not getattr(self, "_pmod_routing_hook", None):
            self._pmod_routing_hook = self.register_forward_pre_hook(
                _add_routing_inputs, with_kwargs=True
            )
            self._pmod_loss_hook = self.register_forward_hook(_add_routing_loss, with_kwargs=True)


def _add_routing_inputs(model, args, kwargs):
    """Forward pre-hook: tell the layers which tokens are vision tokens and which are real.

    A hook rather than a ``forward`` override keeps the HF signature that ``generate`` inspects.
    ``vision_mask`` (batch, seq) may be passed instead of ``input_ids`` (with ``inputs_embeds``).
    """
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    attention_mask = kwargs.get("attention_mask")
    vision_mask = kwargs.pop("vision_mask", None)
    if vision_mask is None and input_ids is not None:
        vision_mask = input_ids == model.config.image_token_id
    if vision_mask is not None:
        seq = vision_mask.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2:
            token_valid = attention_mask[:, -seq:].bool()
        else:
            token_valid = torch.ones_like(vision_mask)
        kwargs["pmod_routing"] = RoutingInputs(vision_mask=vision_mask, token_valid=token_valid)
    return args, kwargs


def _add_routing_loss(model, args, kwargs, output):
    """Forward hook: add the layers' auxiliary routing losses (if any) to the language-model loss."""
    routing = kwargs.get("pmod_routing")
    if routing is not None and routing.aux_losses and getattr(output, "loss", None) is not None:
        output.loss = output.loss + torch.stack(routing.aux_losses).sum()
    return output


class PMoDLlavaForConditionalGeneration(PMoDModelMixin, LlavaForConditionalGeneration):
    config_class = PMoDLlavaConfig

    def __init__(self, config: PMoDLlavaConfig):
        super().__init__(config)
        _convert_decoder_layers(self, PMoDConfig.from_dict(config.pmod or {}))
        self._install_routing_hook()


class PMoDLlavaNextForConditionalGeneration(PMoDModelMixin, LlavaNextForConditionalGeneration):
    config_class = PMoDLlavaNextConfig

    def __init__(self, config: PMoDLlavaNextConfig):
        super().__init__(config)
        _convert_decoder_layers(self, PMoDConfig.from_dict(config.pmod or {}))
        self._install_routing_hook()


# dense HF class -> (p-MoD config class, p-MoD model class)
_PMOD_CLASSES = {
    LlavaForConditionalGeneration: (PMoDLlavaConfig, PMoDLlavaForConditionalGeneration),
    LlavaNextForConditionalGeneration: (PMoDLlavaNextConfig, PMoDLlavaNextForConditionalGeneration),
}


def _convert_decoder_layers(model, config: PMoDConfig) -> None:
    text_model = model.model.language_model
    ratios = config.retention_ratios(len(text_model.layers))
    shared_router = None
    if config.shared_router and any(r < 1.0 for r in ratios):
        shared_router = getattr(text_model, "pmod_shared_router", None)
        if shared_router is None:
            # the width from the config: under ZeRO-3's zero.Init a parameter's shape is (0,)
            reference = text_model.norm.weight
            hidden_size = model.config.text_config.hidden_size
            shared_router = Router(hidden_size, device=reference.device, dtype=reference.dtype)
            text_model.pmod_shared_router = shared_router
    elif getattr(text_model, "pmod_shared_router", None) is not None:
        del text_model.pmod_shared_router
    for layer, ratio in zip(text_model.layers, ratios, strict=True):
        convert_layer(layer, ratio, config, shared_router)


def apply_pmod(model, config: PMoDConfig | None = None, **overrides: Any):
    """Convert an HF LLaVA / LLaVA-NeXT model into a p-MoD model, in place, and return it.

    ``config`` defaults to the released code's setting (PRD cosine, beta 0.5, TanhNorm alpha 0.2,
    STRing, MLP reweighting); keyword overrides change single options (``apply_pmod(m, beta=0.4)``).
    Converting a p-MoD model again re-plans its layers (routers of layers that stay MoD are kept).
    """
    if isinstance(model, PMoDModelMixin):
        dense_class = next(base for base in _PMOD_CLASSES if isinstance(model, base))
        current = model.pmod_config
    else:
        dense_class = type(model) if type(model) in _PMOD_CLASSES else None
        current = PMoDConfig()
    if dense_class is None:
        raise UnsupportedModelError(
            f"apply_pmod supports LlavaForConditionalGeneration and LlavaNextForConditionalGeneration, "
            f"not {type(model).__name__}"
        )
    text_type = model.config.text_config.model_type
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise UnsupportedModelError(
            f"p-MoD supports {', '.join(SUPPORTED_TEXT_MODELS)} language models, not {text_type!r}"
        )
    pmod_config = config if config is not None else current
    if overrides:
        pmod_config = pmod_config.replace(**overrides)
    config_class, model_class = _PMOD_CLASSES[dense_class]
    model.config.__class__ = config_class
    model.config.pmod = pmod_config.to_dict()
    model.__class__ = model_class
    _convert_decoder_layers(model, pmod_config)
    model._install_routing_hook()
    return model


class UnsupportedModelError(UserError, TypeError):
    """The model is not a LLaVA layout with a supported language model."""


def is_pmod_model(model) -> bool:
    return isinstance(model, PMoDModelMixin)


def mod_layer_indices(model) -> list[int]:
    return [
        i
        for i, layer in enumerate(model.model.language_model.layers)
        if isinstance(layer, PMoDLayerMixin) and layer.is_mod
    ]


def register() -> None:
    """Make p-MoD checkpoints loadable through the Auto classes (runs on ``import pmod_cli``)."""
    for config_class, model_class, processor_class, dense_type in (
        (PMoDLlavaConfig, PMoDLlavaForConditionalGeneration, LlavaProcessor, "llava"),
        (
            PMoDLlavaNextConfig,
            PMoDLlavaNextForConditionalGeneration,
            LlavaNextProcessor,
            "llava_next",
        ),
    ):
        # the same weight-name mapping as the dense model: llava-hf checkpoints load, and a model
        # loaded from one saves in the same layout
        dense_mapping = get_checkpoint_conversion_mapping(dense_type)
        if dense_mapping is not None:
            register_checkpoint_conversion_mapping(
                config_class.model_type, dense_mapping, overwrite=True
            )
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
        AutoProcessor.register(config_class, processor_class, exist_ok=True)
