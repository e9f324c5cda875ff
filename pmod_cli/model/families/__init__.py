"""The model families pmod converts, one module each (see ``base.py`` for what a family says).

Every module of this package registers its family when imported (the built-in ones first, in
this order); another installed package adds one through the ``pmod_cli.families`` entry point
group (a module that registers it). docs/extending.md walks through adding one.
"""

import importlib as _importlib
import pkgutil as _pkgutil
from importlib import metadata as _metadata

# isort: off
from . import llava, llava_next, llava_onevision, qwen2_5_vl, qwen3_vl  # noqa: F401

# isort: on
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

ENTRY_POINT_GROUP = "pmod_cli.families"
# shared pieces, not families: base class, token geometry, shape dataclasses, tiny-model inputs
_SHARED = {"base", "geometry", "shapes", "tiny"}
for _module in _pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        _importlib.import_module(f"{__name__}.{_module.name}")
for _entry_point in _metadata.entry_points(group=ENTRY_POINT_GROUP):
    _entry_point.load()
