"""LLaVA-NeXT (LLaVA-1.6): anyres. A base crop of the whole image plus the crops of the best grid
of ``image_grid_pinpoints``; the high-resolution features are unpadded and each of their rows ends
in a learned newline token (``image_newline``), which counts as a vision token."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from ...errors import UserError
from ..pmod_model import PMoDModelMixin
from .base import encoded_token_counts, register_family
from .geometry import (
    BASE_VIEW,
    HIGH_RES_VIEW,
    AnyresLayout,
    FeatureCell,
    PatchBox,
    anyres_layout,
    anyres_tokens,
    grid_box,
    resize_crop,
    size_field,
)
from .llava import LlavaLayoutFamily, processor_geometry


class PMoDLlavaNextConfig(LlavaNextConfig):
    model_type = "pmod_llava_next"
    pmod: dict | None = None
    pmod_method: dict | None = None  # another method the layers run (TokenMethod.to_dict)


class PMoDLlavaNextForConditionalGeneration(PMoDModelMixin, LlavaNextForConditionalGeneration):
    config_class = PMoDLlavaNextConfig


@register_family
class LlavaNextFamily(LlavaLayoutFamily):
    name = "llava_next"
    title = "LLaVA-NeXT"
    dense_config_class = LlavaNextConfig
    dense_model_class = LlavaNextForConditionalGeneration
    pmod_config_class = PMoDLlavaNextConfig
    pmod_model_class = PMoDLlavaNextForConditionalGeneration
    processor_class = LlavaNextProcessor
    aspect_ratios = ("anyres",)
    connector_parameters = ("model.multi_modal_projector.", "model.image_newline")

    def config_options(self, image_grid_pinpoints: list[list[int]] | None) -> dict[str, Any]:
        if not image_grid_pinpoints:
            raise UserError('model.layout = "llava_next" needs model.image_grid_pinpoints')
        return {"image_grid_pinpoints": [list(p) for p in image_grid_pinpoints]}

    def image_processor(self, settings: dict[str, Any], aspect_ratio: str, grid_pinpoints) -> Any:
        return LlavaNextImageProcessor(**settings, image_grid_pinpoints=grid_pinpoints)

    def init_new_connector(self, model, dtype: torch.dtype) -> None:
        hidden = model.config.text_config.hidden_size
        model.model.image_newline = nn.Parameter(
            torch.randn(hidden, dtype=dtype) / math.sqrt(hidden)
        )

    def vision_token_groups(self, config, inputs: dict[str, Any]) -> list[tuple[int, list[int]]]:
        counts = encoded_token_counts(inputs, "image")
        if counts is not None:
            return [(config.image_token_id, counts)]
        image_sizes = inputs.get("image_sizes")
        sizes = [] if image_sizes is None else image_sizes.tolist()
        vision = config.vision_config
        counts = [
            anyres_tokens(
                height,
                width,
                grid_pinpoints=config.image_grid_pinpoints,
                tile_size=vision.image_size,
                side=vision.image_size // vision.patch_size,
            )[0]
            for height, width in sizes
        ]
        return [(config.image_token_id, counts)]

    def image_tokens(self, shape) -> tuple[int, int]:
        return max(
            _grid_tokens(shape, height, width) for height, width in shape.image_grid_pinpoints
        )

    def patch_boxes(self, processor, config, image_height: int, image_width: int) -> list:
        strategy = config.vision_feature_select_strategy
        if strategy != "default":
            raise UserError(
                f"pmod visualize maps LLaVA-NeXT tokens for vision_feature_select_strategy 'default', not {strategy!r}"
            )
        return llava_next_patch_boxes(
            image_height,
            image_width,
            grid_pinpoints=config.image_grid_pinpoints,
            tile_size=config.vision_config.image_size,
            **processor_geometry(processor, config),
        )


def _grid_tokens(shape, height: int, width: int) -> tuple[int, int]:
    """(vision tokens, crops) of an image that fills the grid (height, width) exactly."""
    vision = shape.vision
    side = vision.patches_per_side
    rows, cols = height // vision.image_size, width // vision.image_size
    # high-res features are (rows*side, cols*side), one newline token closes each row
    high_res = rows * side * (cols * side + 1)
    return vision.features_per_crop + high_res, 1 + rows * cols


# ---- where each vision token sits ------------------------------------------------------------
#
# LlavaNextImageProcessor + LlavaNextModel.pack_image_features: first the base view (the whole
# image squashed to a square crop), then the high-resolution view: the image is resized (aspect
# kept) into the best grid of image_grid_pinpoints, padded to it, cut into tiles; the tiles' patch
# features form one (grid_h * cells, grid_w * cells) map whose padding rows or columns are cut away
# ("unpadding") and after each remaining row comes one learned newline token, which has no place
# on the image (None).


def llava_next_cells(base_rows: int, base_cols: int, layout: AnyresLayout) -> list[FeatureCell]:
    """The feature cell of each LLaVA-NeXT vision token, in the order ``pack_image_features`` packs them."""
    cells = [
        FeatureCell(BASE_VIEW, row, col) for row in range(base_rows) for col in range(base_cols)
    ]
    for row in layout.rows:
        cells += [FeatureCell(HIGH_RES_VIEW, row, col) for col in layout.cols]
        cells.append(FeatureCell(HIGH_RES_VIEW, row, None))  # the row's newline token
    return cells


def llava_next_patch_boxes(
    image_height: int,
    image_width: int,
    *,
    grid_pinpoints: list,
    tile_size: int,
    patch_size: int,
    size: Any,
    crop_size: Any | None,
    do_resize: bool = True,
) -> list[PatchBox | None]:
    """One box per LLaVA-NeXT vision token, in token order; ``None`` for the row newlines.

    ``tile_size`` is the vision tower's input size (``vision_config.image_size``); ``size``,
    ``crop_size``, ``do_resize`` are the image processor's.
    """
    processing = dict(size=size, crop_size=crop_size, do_resize=do_resize)
    (base_rows, base_cols), base_box = _base_view(
        image_height, image_width, patch_size=patch_size, **processing
    )
    layout, high_res_box = _high_res_view(
        image_height,
        image_width,
        grid_pinpoints=grid_pinpoints,
        tile_size=tile_size,
        patch_size=patch_size,
        **processing,
    )
    boxes: list[PatchBox | None] = []
    for cell in llava_next_cells(base_rows, base_cols, layout):
        if cell.view == BASE_VIEW:
            boxes.append(base_box(cell.row, cell.col))
        elif cell.col is None:
            boxes.append(None)
        else:
            boxes.append(high_res_box(cell.row, cell.col))
    return boxes


def _base_view(image_height: int, image_width: int, *, patch_size: int, size, crop_size, do_resize):
    """The base view, the whole image squashed to a square, then the usual resize and crop:
    ((rows, columns) of its cells, the box of a cell on the image)."""
    fixed_height, fixed_width = size_field(size, "height"), size_field(size, "width")
    squash = (
        (fixed_height, fixed_width)
        if fixed_height and fixed_width
        else (size_field(size, "shortest_edge"),) * 2
    )
    base_chain = resize_crop(
        squash[0], squash[1], size=size, crop_size=crop_size, do_resize=do_resize
    )
    to_squash_x, to_squash_y = image_width / squash[1], image_height / squash[0]

    def base_box(row: int, col: int) -> PatchBox:
        box = grid_box(base_chain, BASE_VIEW, row, col, patch_size)
        return PatchBox(
            BASE_VIEW,
            box.x0 * to_squash_x,
            box.y0 * to_squash_y,
            box.x1 * to_squash_x,
            box.y1 * to_squash_y,
        )

    cells = (base_chain.view_height // patch_size, base_chain.view_width // patch_size)
    return cells, base_box


def _high_res_view(
    image_height: int,
    image_width: int,
    *,
    grid_pinpoints: list,
    tile_size: int,
    patch_size: int,
    size,
    crop_size,
    do_resize,
):
    """The high-resolution view, the image resized into the best grid, padded and cut into
    tiles: (its layout, the box of a cell of the tiles' feature map on the image)."""
    # each tile goes through the same resize and crop before the vision tower
    tile_chain = resize_crop(
        tile_size, tile_size, size=size, crop_size=crop_size, do_resize=do_resize
    )
    cells_per_tile = tile_chain.view_height // patch_size
    layout = anyres_layout(
        image_height,
        image_width,
        grid_pinpoints=grid_pinpoints,
        tile_size=tile_size,
        cells_per_tile=cells_per_tile,
    )
    unresize_x, unresize_y = (
        image_width / layout.resized_width,
        image_height / layout.resized_height,
    )

    def high_res_box(row: int, col: int) -> PatchBox:
        tile_row, cell_row = divmod(row, cells_per_tile)
        tile_col, cell_col = divmod(col, cells_per_tile)
        corners = []
        for dx, dy in ((0, 0), (1, 1)):
            tile_x, tile_y = tile_chain.to_source(
                (cell_col + dx) * patch_size, (cell_row + dy) * patch_size
            )
            padded_x, padded_y = tile_col * tile_size + tile_x, tile_row * tile_size + tile_y
            corners.append(
                (
                    (padded_x - layout.paste_left) * unresize_x,
                    (padded_y - layout.paste_top) * unresize_y,
                )
            )
        (x0, y0), (x1, y1) = corners
        return PatchBox(HIGH_RES_VIEW, x0, y0, x1, y1)

    return layout, high_res_box
