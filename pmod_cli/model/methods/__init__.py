"""Token-reduction methods: p-MoD itself and the methods it is compared with, one module each.

``base.py`` defines what a method is (``TokenMethod``), the registry (``@register_method``) and
the ``--method NAME[:key=value,...]`` syntax. The built-in methods:

- ``pmod``: the checkpoint's own routing (its routers choose, p-MoD reweights);
- ``dense``: every layer processes every token;
- ``fastv``: FastV, prune after layer K by the attention received in layer K-1;
- ``random``: p-MoD's per-layer budget drawn at random;
- ``pool``: each image's patch grid average-pooled to N tokens before the language model.

A method is stored on a model as ``config.pmod_method`` (its ``to_dict``);
``modeling.apply_method`` installs one. docs/extending.md shows how to add one.
"""

import importlib as _importlib
import pkgutil as _pkgutil

# each module registers its method: the built-in ones first, in the order help and tables list them
# isort: off
from . import pmod, dense, fastv, random, pool  # noqa: F401
# isort: on

from .attention import current_prompt_length, prompt_ends, prompt_length, received_attention
from .base import (
    ENTRY_POINT_GROUP,
    LAYER_MODES,
    MethodError,
    TokenMethod,
    make_method,
    method_class,
    method_from_dict,
    method_names,
    method_registry,
    parse_method,
    parse_methods,
    register_method,
)
from .fastv import FASTV_SCORES, fastv_kept
from .placeholders import cut_image_placeholders
from .pool import pool_features, pool_grid, pool_token_counts
from .random import random_scores

__all__ = [
    "ENTRY_POINT_GROUP",
    "FASTV_SCORES",
    "LAYER_MODES",
    "MethodError",
    "TokenMethod",
    "current_prompt_length",
    "fastv_kept",
    "make_method",
    "method_class",
    "method_from_dict",
    "method_names",
    "method_registry",
    "parse_method",
    "parse_methods",
    "pool_features",
    "pool_grid",
    "cut_image_placeholders",
    "pool_token_counts",
    "prompt_ends",
    "prompt_length",
    "random_scores",
    "received_attention",
    "register_method",
]

# any other module of this package registers its method too: a new method is one module here
_HELPERS = {"attention", "base", "placeholders"}
for _module in _pkgutil.iter_modules(__path__):
    if _module.name not in _HELPERS:
        _importlib.import_module(f"{__name__}.{_module.name}")
