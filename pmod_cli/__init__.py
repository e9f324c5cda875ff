"""pmod: p-MoD (Mixture-of-Depths with progressive ratio decay) for LLaVA-family models.

Importing the package registers the p-MoD model types with transformers' Auto classes.
"""

from .model import (
    MethodConfig,
    PMoDConfig,
    apply_dense,
    apply_fastv,
    apply_method,
    apply_pmod,
    apply_pool,
    apply_random,
    record_routing,
)

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
]
