"""pmod: p-MoD (Mixture-of-Depths with progressive ratio decay) for multimodal LLMs.

``import pmod_cli`` is instant (the ``pmod`` command answers ``--help`` without torch) and changes
nothing else: the model code loads on first use of one of its names (``PMoDConfig``,
``apply_pmod``, ``apply_method``, ``make_method``, ``record_routing``, ...).

The p-MoD model types (``pmod_llava``, ``pmod_llava_next``, ...) are registered with
transformers' Auto classes when the model code loads, or explicitly with ``pmod_cli.register()``:

    import pmod_cli
    pmod_cli.register()  # AutoModelForImageTextToText.from_pretrained now loads p-MoD checkpoints

(pmod 0.1 hooked ``import transformers`` to register on it; an explicit call is what users of
HF custom models expect, and ``import pmod_cli`` no longer changes how another import runs.)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = [
    "PMoDConfig",
    "TokenMethod",
    "__version__",
    "apply_dense",
    "apply_fastv",
    "apply_method",
    "apply_pmod",
    "apply_pool",
    "apply_random",
    "make_method",
    "parse_method",
    "record_routing",
    "register",
]

# names served by pmod_cli.model, imported on first access (PEP 562)
_MODEL_NAMES = (
    "PMoDConfig",
    "TokenMethod",
    "apply_dense",
    "apply_fastv",
    "apply_method",
    "apply_pmod",
    "apply_pool",
    "apply_random",
    "make_method",
    "parse_method",
    "record_routing",
)


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module(".model", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODEL_NAMES})


def register() -> None:
    """Register the p-MoD model types with transformers' Auto classes (idempotent).

    Importing ``pmod_cli.model`` (which any of pmod's model names does) registers them too.
    """
    importlib.import_module(".model", __name__)
