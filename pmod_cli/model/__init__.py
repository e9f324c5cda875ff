"""The p-MoD model core: schedules, router, the p-MoD layer, its cache, the model families,
conversion and loading."""

from .cache import kv_cache_bytes, kv_cache_lengths
from .config import PMoDConfig
from .families import FAMILIES, family_for_model, get_family
from .methods import (
    MethodError,
    TokenMethod,
    make_method,
    method_names,
    parse_method,
    parse_methods,
    register_method,
)
from .modeling import (
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
    apply_dense,
    apply_fastv,
    apply_method,
    apply_pmod,
    apply_pool,
    apply_random,
    is_pmod_model,
    mod_layer_indices,
    register,
)
from .routing import record_routing
from .schedules import SCHEDULES, kept_count, retention_ratios

register()

__all__ = [
    "FAMILIES",
    "SCHEDULES",
    "TokenMethod",
    "MethodError",
    "PMoDConfig",
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
    "apply_dense",
    "apply_fastv",
    "apply_method",
    "apply_pmod",
    "apply_pool",
    "apply_random",
    "family_for_model",
    "get_family",
    "is_pmod_model",
    "kept_count",
    "kv_cache_bytes",
    "kv_cache_lengths",
    "make_method",
    "method_names",
    "mod_layer_indices",
    "parse_method",
    "parse_methods",
    "record_routing",
    "register_method",
    "retention_ratios",
]
