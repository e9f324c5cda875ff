"""pmod: p-MoD (Mixture-of-Depths with progressive ratio decay) for LLaVA-family models.

``import pmod_cli`` is instant (the ``pmod`` command answers ``--help`` without torch); the
heavy parts load when used:

- ``PMoDConfig``, ``apply_pmod``, ``record_routing`` and the baselines' ``MethodConfig``,
  ``apply_fastv``, ``apply_random``, ``apply_pool``, ``apply_dense``, ``apply_method`` load the
  model code on first access;
- the p-MoD model types (``pmod_llava``, ``pmod_llava_next``) are registered with transformers'
  Auto classes as soon as transformers is imported (at once if it already is), so after
  ``import pmod_cli`` ``AutoModelForImageTextToText.from_pretrained`` loads p-MoD checkpoints
  whatever the import order. ``pmod_cli.register()`` does it explicitly.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"
__all__ = [
    "MethodConfig",
    "PMoDConfig",
    "__version__",
    "apply_dense",
    "apply_fastv",
    "apply_method",
    "apply_pmod",
    "apply_pool",
    "apply_random",
    "record_routing",
    "register",
]

# names served by pmod_cli.model, imported on first access (PEP 562)
_MODEL_NAMES = (
    "MethodConfig",
    "PMoDConfig",
    "apply_dense",
    "apply_fastv",
    "apply_method",
    "apply_pmod",
    "apply_pool",
    "apply_random",
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

    Importing ``pmod_cli.model`` registers them; this only makes sure it has been imported.
    """
    importlib.import_module(".model", __name__)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Import hook: the first ``import transformers`` runs ``register()`` right after it.

    It finds transformers' own spec and wraps its loader's ``exec_module``; every other import
    passes through untouched, and the hook removes itself on first use.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once; the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = _then_register(spec.loader.exec_module)
        return spec


def _then_register(exec_module):
    def exec_module_then_register(module) -> None:
        exec_module(module)
        try:
            register()
        except Exception as err:  # pmod must never break `import transformers` for other code
            warnings.warn(
                f"pmod_cli could not register its model types with transformers ({type(err).__name__}: "
                f"{err}); call pmod_cli.register() once transformers is imported",
                stacklevel=2,
            )

    return exec_module_then_register


if "transformers" in sys.modules:
    register()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
