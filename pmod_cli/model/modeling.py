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
    PMoDLlavaOnevisionConfig,
    PMoDLlavaOnevisionForConditionalGeneration,
    PMoDQwen2_5_VLConfig,
    PMoDQwen2_5_VLForConditionalGeneration,
    PMoDQwen3VLConfig,
    PMoDQwen3VLForConditionalGeneration,
    UnsupportedModelError,
    family_for_model,
)
from .layer import PMoDLayerMixin
from .methods import TokenMethod, method_from_dict, parse_method
from .pmod_model import PMoDModelMixin, convert_decoder_layers, install_method

__all__ = [
    "PMoDLlavaConfig",
    "PMoDLlavaForConditionalGeneration",
    "PMoDLlavaNextConfig",
    "PMoDLlavaNextForConditionalGeneration",
    "PMoDLlavaOnevisionConfig",
    "PMoDLlavaOnevisionForConditionalGeneration",
    "PMoDQwen2_5_VLConfig",
    "PMoDQwen2_5_VLForConditionalGeneration",
    "PMoDQwen3VLConfig",
    "PMoDQwen3VLForConditionalGeneration",
    "UnsupportedModelError",
    "apply_dense",
    "apply_fastv",
    "apply_method",
    "apply_pmod",
    "apply_pool",
    "apply_random",
    "is_pmod_model",
    "mod_layer_indices",
    "register",
]


def apply_pmod(model, config: PMoDConfig | None = None, **overrides: Any):
    """Convert an HF model of a registered family into a p-MoD model, in place, and return it.

    ``config`` defaults to the released code's setting (PRD cosine, beta 0.5, TanhNorm alpha 0.2,
    STRing, MLP reweighting); keyword overrides change single options (``apply_pmod(m, beta=0.4)``).
    Converting a p-MoD model again re-plans its layers (routers of layers that stay MoD are kept),
    and a model running a baseline method (``apply_fastv``, ...) goes back to its own routing.
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
    model.config.pmod_method = None
    install_method(model, method_from_dict(None))
    return model


def apply_method(model, method: TokenMethod | str, pmod: PMoDConfig | None = None, **options: Any):
    """Run ``model`` (dense or p-MoD, of a registered family) with a token-reduction method, in
    place, and return it: a registered method's name or spec (``pmod``, ``dense``, ``fastv``,
    ``random``, ``pool``, ``"fastv:layer=3"``; see ``methods/``) or a ``TokenMethod``.

    ``options`` are the method's options (``layer=2, ratio=0.5`` for FastV). A dense model is
    given p-MoD's structure first (``pmod``, default the released setting, with fresh routers that
    only the ``pmod`` method would use), so the random method has p-MoD's budget; a p-MoD model keeps
    its routers and plan. Invalid settings raise ``MethodError`` (a ValueError).
    """
    if isinstance(method, str):
        method = parse_method(method)
    if options:
        method = method.replace(**options)
    if not is_pmod_model(model) or pmod is not None:
        apply_pmod(model, pmod)
    install_method(model, method)  # checks the setting against the model before it is recorded
    model.config.pmod_method = None if method.name == "pmod" else method.to_dict()
    return model


def apply_fastv(model, layer: int = 2, ratio: float = 0.5, score: str = "last"):
    """FastV: after layer ``layer`` (K) keep round(V * (1 - ``ratio``)) vision tokens, ranked by the
    attention they get in layer K-1 (``ratio`` is FastV's R, the fraction dropped)."""
    return apply_method(model, "fastv", layer=layer, ratio=ratio, score=score)


def apply_random(model, seed: int = 0, pmod: PMoDConfig | None = None):
    """Random selection at p-MoD's per-layer budget (the model's own plan, or ``pmod``)."""
    return apply_method(model, "random", pmod=pmod, seed=seed)


def apply_pool(model, tokens: int):
    """Average-pool each image's vision tokens to ``tokens`` before the language model."""
    return apply_method(model, "pool", tokens=tokens)


def apply_dense(model):
    """Every layer processes every token (a p-MoD checkpoint's routers go unused)."""
    return apply_method(model, "dense")


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
        # some are keyed by class name (Qwen2.5-VL saves its language model as ``model.*``)
        class_mapping = get_checkpoint_conversion_mapping(family.dense_model_class.__name__)
        if class_mapping is not None:
            register_checkpoint_conversion_mapping(
                family.pmod_model_class.__name__, class_mapping, overwrite=True
            )
        AutoConfig.register(family.pmod_model_type, family.pmod_config_class, exist_ok=True)
        AutoModelForImageTextToText.register(
            family.pmod_config_class, family.pmod_model_class, exist_ok=True
        )
        AutoProcessor.register(family.pmod_config_class, family.processor_class, exist_ok=True)
