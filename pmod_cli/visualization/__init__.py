"""Which image patches each p-MoD layer keeps: token -> patch mapping, the figure, ``pmod visualize``.

- ``patches``: vision-token index -> rectangle on the original image, by the model's family
  (each family module replays its processor's resize/crop, tiles, padding, unpadding, newlines);
- ``selection``: one forward pass under ``record_routing`` -> every layer's kept mask and weights;
- ``figure``: the matplotlib figure (panels per layer and view, the Figure-6 matrix, heatmaps);
- ``visualize``: loading a checkpoint, the whole command, the rich table.
"""

from ..model.families.llava import llava_patch_boxes
from ..model.families.llava_next import llava_next_patch_boxes
from .patches import PatchBox, patch_boxes_for
from .selection import LayerSelection, TokenSelection, default_layers, select_tokens
from .visualize import DEFAULT_CHECKPOINT, kept_table, visualize_routing

__all__ = [
    "DEFAULT_CHECKPOINT",
    "LayerSelection",
    "PatchBox",
    "TokenSelection",
    "default_layers",
    "kept_table",
    "llava_next_patch_boxes",
    "llava_patch_boxes",
    "patch_boxes_for",
    "select_tokens",
    "visualize_routing",
]
