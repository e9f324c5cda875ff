"""Which image patches each p-MoD layer keeps: token -> patch mapping, the figure, ``pmod visualize``.

- ``patches``: pure functions, vision-token index -> rectangle on the original image
  (LLaVA-1.5 resize/crop, LLaVA-NeXT base view, tiles, padding, unpadding, newlines);
- ``selection``: one forward pass under ``record_routing`` -> every layer's kept mask and weights;
- ``figure``: the matplotlib figure (panels per layer and view, the Figure-6 matrix, heatmaps);
- ``visualize``: loading a checkpoint, the whole command, the rich table.
"""

from .patches import PatchBox, llava_next_patch_boxes, llava_patch_boxes, patch_boxes_for
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
