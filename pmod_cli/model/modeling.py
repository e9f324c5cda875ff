"""``apply_pmod`` and the Auto-class registration, for every registered model family.

A p-MoD checkpoint has its own ``model_type`` (``pmod_llava``, ``pmod_llava_next``, ...) so it can
never load silently as a dense model; its config carries the ``PMoDConfig`` as ``config.pmod``. The
p-MoD classes (``families/``) subclass the HF ones, so ``generate``,
``save_pretrained``/``from_pretrained``, the Trainer and DeepSpeed see the HF model with one small
router per MoD layer.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

from .config import PMoDConfig
from .families import (
    FAMILIES,
    PMoDLlavaConfig,
    PMoDLlavaForConditionalGeneration,
    PMoDLlavaNextConfig,
    PMoDLlavaNextForConditionalGeneration,
    UnsupportedModelError,
    family_for_model,
)
from .layer import PMoDLayerMixin
from .pmod_model import PMoDModelMixin, convert_decoder_layers

__all__ = [
    "PMoDLlavaConfig",
    "PMoDLlavaForConditionalGeneration",
    "PMoDLlavaNextConfig",
    "PMoDLlavaNextForConditionalGeneration",
    "UnsupportedModelError",
    "apply_pmod",
    "is_pmod_model",
    "mod_layer_indices",
    "register",
]


def apply_pmod(model, config: PMoDConfig | None = None, **overrides: Any):
    """Convert an HF model of a registered family into a p-MoD model, in place, and return it.

    ``config`` defaults to the released code's setting (PRD cosine, beta 0.5, TanhNorm alpha 0.2,
    STRing, MLP reweighting); keyword overrides change single options (``apply_pmod(m, beta=0.4)``).
    Converting a p-MoD model again re-plans its layers (routers of layers that stay MoD are kept).
    """
    family = family_for_model(model)
    family.check_text_model(model.config.text_config.model_type)
    pmod_config = (
        config
        if config is not None
        else (model.pmod_config if is_pmod_model(model) else PMoDConfig())
    )
    if overrides:
        pmod_config = pmod_config.replace(**overrides)
    model.config.__class__ = family.pmod_config_class
    model.config.pmod = pmod_config.to_dict()
    model.__class__ = family.pmod_model_class
    convert_decoder_layers(model, pmod_config)
    model.install_routing_hooks()
    return model


def is_pmod_model(model) -> bool:
    return isinstance(model, PMoDModelMixin)


def mod_layer_indices(model) -> list[int]:
    """Indices of the decoder layers that route (ratio < 1); none for a dense model."""
    layers = family_for_model(model).decoder_layers(model)
    return [
        i for i, layer in enumerate(layers) if isinstance(layer, PMoDLayerMixin) and layer.is_mod
    ]


def register() -> None:
    """Make p-MoD checkpoints loadable through the Auto classes (runs on ``import pmod_cli``)."""
    for family in FAMILIES.values():
        # the same weight-name mapping as the dense model: legacy checkpoints of the family load,
        # and a model loaded from one saves in the same layout
        dense_mapping = get_checkpoint_conversion_mapping(family.dense_model_type)
        if dense_mapping is not None:
            register_checkpoint_conversion_mapping(
                family.pmod_model_type, dense_mapping, overwrite=True
            )
        AutoConfig.register(family.pmod_model_type, family.pmod_config_class, exist_ok=True)
        AutoModelForImageTextToText.register(
            family.pmod_config_class, family.pmod_model_class, exist_ok=True
        )
        AutoProcessor.register(family.pmod_config_class, family.processor_class, exist_ok=True)
