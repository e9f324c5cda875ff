"""The model families pmod converts, one module each (see ``base.py`` for what a family says)."""

from . import llava, llava_next, llava_onevision, qwen2_5_vl, qwen3_vl  # noqa: F401  (each module registers its family)
from .base import (
    FAMILIES,
    IMAGE_TOKEN,
    ModelFamily,
    UnsupportedModelError,
    family_for_config,
    family_for_model,
    family_for_model_type,
    family_for_processor,
    get_family,
    image_settings,
    known_model_types,
    prepare_tokenizer,
    register_family,
    template_for_model,
)
from .llava import PMoDLlavaConfig, PMoDLlavaForConditionalGeneration
from .llava_next import PMoDLlavaNextConfig, PMoDLlavaNextForConditionalGeneration
from .llava_onevision import PMoDLlavaOnevisionConfig, PMoDLlavaOnevisionForConditionalGeneration
from .qwen2_5_vl import PMoDQwen2_5_VLConfig, PMoDQwen2_5_VLForConditionalGeneration
from .qwen3_vl import PMoDQwen3VLConfig, PMoDQwen3VLForConditionalGeneration

__all__ = [
    "FAMILIES",
    "IMAGE_TOKEN",
    "ModelFamily",
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
    "family_for_config",
    "family_for_model",
    "family_for_model_type",
    "family_for_processor",
    "get_family",
    "image_settings",
    "known_model_types",
    "prepare_tokenizer",
    "register_family",
    "template_for_model",
]
