"""pmod: p-MoD (Mixture-of-Depths with progressive ratio decay) for LLaVA-family models.

Importing the package registers the p-MoD model types with transformers' Auto classes.
"""

from .model import PMoDConfig, apply_pmod, record_routing

__version__ = "0.1.0"
__all__ = ["PMoDConfig", "__version__", "apply_pmod", "record_routing"]
