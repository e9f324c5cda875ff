"""The model families pmod converts, one module each (see ``base.py`` for what a family says)."""

from . import llava, llava_next, llava_onevision  # noqa: F401  (each module registers its family)
from .base import (
    FAMILIES,
    ModelFamily,
    UnsupportedModelError,
    family_for_config,
    family_for_model,
    family_for_model_type,
    get_family,
    image_settings,
    known_model_types,
    register_family,
    template_for_model,
)
from .llava import PMoDLlavaConfig, PMoDLlavaForConditionalGeneration
from .llava_next import PMoDLlavaNextConfig, PMoDLlavaNextForConditionalGeneration
from .llava_onevision import PMoDLlavaOnevisionConfig, PMoDLlavaOnevisionForConditionalGeneration

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "PMoDLlavaConfig",
    "PMoDLlavaForConditionalGeneration",
    "PMoDLlavaNextConfig",
    "PMoDLlavaNextForConditionalGeneration",
    "PMoDLlavaOnevisionConfig",
    "PMoDLlavaOnevisionForConditionalGeneration",
    "UnsupportedModelError",
    "family_for_config",
    "family_for_model",
    "family_for_model_type",
    "get_family",
    "image_settings",
    "known_model_types",
    "register_family",
    "template_for_model",
]
