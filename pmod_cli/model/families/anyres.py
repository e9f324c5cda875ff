"""Anyres token arithmetic shared by LLaVA-NeXT and LLaVA-OneVision: how many vision tokens an
image of a given size becomes, replayed from the HF models' own packing (no pixels needed).

An anyres image is a base crop (``side x side`` features) plus the crops of the best grid of
``image_grid_pinpoints``: their features form one ``(rows * side, cols * side)`` map whose padding
rows or columns are cut away ("unpadding"); OneVision's ``anyres_max_N`` then shrinks a map larger
than N crops (by more than 10 %) back to about N crops, and every remaining row ends in one learned
newline token.
"""

from __future__ import annotations

import math

from transformers.image_processing_utils import select_best_resolution


def grid_shape(height: int, width: int, grid_pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of crops of the pinpoint an (height, width) image is fitted into."""
    best_height, best_width = select_best_resolution(
        (height, width), [list(p) for p in grid_pinpoints]
    )
    return best_height // tile_size, best_width // tile_size


def unpadded_window(
    image_height: int, image_width: int, map_height: int, map_width: int
) -> tuple[range, range]:
    """Rows and columns of the (map_height, map_width) feature map that survive HF's ``unpad_image``."""
    if image_width / image_height > map_width / map_height:
        new_height = int(round(image_height * (map_width / image_width), 7))
        padding = (map_height - new_height) // 2
        return range(padding, map_height - padding), range(map_width)
    new_width = int(round(image_width * (map_height / image_height), 7))
    padding = (map_width - new_width) // 2
    return range(map_height), range(padding, map_width - padding)


def capped_map_size(
    map_height: int, map_width: int, side: int, max_crops: int | None
) -> tuple[int, int]:
    """The unpadded map's size after ``anyres_max_{max_crops}`` (bilinear shrink when it exceeds
    ``max_crops`` crops by more than 10 %); unchanged without a cap (LLaVA-NeXT)."""
    if max_crops is None:
        return map_height, map_width
    ratio = math.sqrt(map_height * map_width / (max_crops * side**2))
    if ratio > 1.1:
        return int(map_height // ratio), int(map_width // ratio)
    return map_height, map_width


def high_res_map(
    height: int,
    width: int,
    *,
    grid_pinpoints,
    tile_size: int,
    side: int,
    max_crops: int | None = None,
) -> tuple[int, int, int]:
    """(rows, cols of high-res features after unpadding and capping, crops of the grid)."""
    grid_rows, grid_cols = grid_shape(height, width, grid_pinpoints, tile_size)
    rows, cols = unpadded_window(height, width, grid_rows * side, grid_cols * side)
    map_height, map_width = capped_map_size(len(rows), len(cols), side, max_crops)
    return map_height, map_width, grid_rows * grid_cols


def anyres_tokens(
    height: int,
    width: int,
    *,
    grid_pinpoints,
    tile_size: int,
    side: int,
    max_crops: int | None = None,
) -> tuple[int, int]:
    """(vision tokens, vision-tower crops) of one anyres image: base + high-res rows + one newline per row."""
    map_height, map_width, grid_crops = high_res_map(
        height,
        width,
        grid_pinpoints=grid_pinpoints,
        tile_size=tile_size,
        side=side,
        max_crops=max_crops,
    )
    return side * side + map_height * (map_width + 1), 1 + grid_crops


def max_crops_of(vision_aspect_ratio: str | None) -> int | None:
    """``"anyres_max_9"`` -> 9; ``"anyres"`` (or none) -> no cap."""
    if vision_aspect_ratio and vision_aspect_ratio.startswith("anyres_max_"):
        return int(vision_aspect_ratio.removeprefix("anyres_max_"))
    return None
