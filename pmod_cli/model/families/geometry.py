"""Token geometry the families share: where a vision token comes from on the image, and how many
an anyres image becomes. Pure arithmetic on sizes, replayed from transformers 5.x's processors
and models (no pixels, no torch: importing this module loads neither).

- **The resize chain** (``resize_crop``): optional pad to a square, resize (shortest edge or
  fixed size), centre crop, as the LLaVA image processors apply them; ``ResizeCrop.to_source``
  maps a pixel of the crop back onto the original image.
- **Anyres** (LLaVA-NeXT, LLaVA-OneVision): a base crop plus the crops of the best grid of
  ``image_grid_pinpoints``; their features form one ``(rows * side, cols * side)`` map whose
  padding rows or columns are cut away ("unpadding"); OneVision's ``anyres_max_N`` then shrinks
  a map larger than N crops (by more than 10 %) back to about N crops, and every remaining row
  ends in one learned newline token (``anyres_tokens`` counts them, ``anyres_layout`` places them).
- **Boxes**: ``PatchBox`` is one vision token's rectangle in original-image pixels. Where a
  processor pads (pad-to-square, a centre crop larger than the resized image, the padding around
  an anyres grid that unpadding does not cut), a rectangle reaches beyond the image: its
  coordinates run below 0 or past the width or height, so a token of pure padding keeps its full
  size and place, and the figure can draw it.

Each family module places its own tokens with these (``ModelFamily.patch_boxes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...errors import UserError

BASE_VIEW = "base"
HIGH_RES_VIEW = "high-res"
IMAGE_VIEW = "image"
FRAME_VIEW = "frame"


@dataclass(frozen=True)
class PatchBox:
    """One vision token's rectangle in original-image pixels; beyond the image where it covers
    padding the processor added (negative, or past the width or height)."""

    view: str  # "image" (LLaVA-1.5), "base" or "high-res" (anyres), "frame" (video)
    x0: float
    y0: float
    x1: float
    y1: float
    source: int = 0  # which picture of the prompt it lies on: images, then video frames, in order

    def on_image(self, height: int, width: int) -> PatchBox | None:
        """The part on the (height, width) image; None for a token of pure padding."""
        x0, x1 = min(max(self.x0, 0.0), width), min(max(self.x1, 0.0), width)
        y0, y1 = min(max(self.y0, 0.0), height), min(max(self.y1, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            return None
        return PatchBox(self.view, x0, y0, x1, y1)


@dataclass(frozen=True)
class FeatureCell:
    """One vision token's cell: (row, col) of its view's feature grid; newlines have col None."""

    view: str
    row: int
    col: int | None  # None: the newline token after ``row`` of the high-res map


# ---- the resize chain -----------------------------------------------------------------------


@dataclass(frozen=True)
class ResizeCrop:
    """One processing chain, source (height, width) -> view: optional pad to square, resize, crop.

    ``to_source`` maps view pixels back to source pixels; it is affine per axis.
    """

    source_height: int
    source_width: int
    pad_top: int  # pad-to-square offsets (0 without it)
    pad_left: int
    padded_height: int
    padded_width: int
    resized_height: int
    resized_width: int
    crop_top: int  # negative when the crop is larger than the image (the processor pads)
    crop_left: int
    view_height: int
    view_width: int

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        source_x = (x + self.crop_left) * self.padded_width / self.resized_width - self.pad_left
        source_y = (y + self.crop_top) * self.padded_height / self.resized_height - self.pad_top
        return source_x, source_y


def size_field(size: Any, key: str) -> int | None:
    """``size[key]`` of a processor's size (a SizeDict; a raw dict comes from older saved configs)."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def resized_size(height: int, width: int, size: Any) -> tuple[int, int]:
    """(height, width) after the processor's ``resize`` with ``size`` (shortest edge or fixed)."""
    fixed_height, fixed_width = size_field(size, "height"), size_field(size, "width")
    if fixed_height and fixed_width:
        return fixed_height, fixed_width
    shortest = size_field(size, "shortest_edge")
    if shortest is None or size_field(size, "longest_edge"):
        raise UserError(
            f"pmod visualize supports image processors sized by shortest_edge or height/width, not {size}"
        )
    # as transformers' get_resize_output_image_size(default_to_square=False)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def _crop_offset(image_extent: int, crop_extent: int) -> int:
    # TorchvisionBackend.center_crop: pad symmetrically when too small, else crop the middle
    if crop_extent > image_extent:
        return -((crop_extent - image_extent) // 2)
    return int((image_extent - crop_extent) / 2.0)


def resize_crop(
    height: int,
    width: int,
    *,
    size: Any,
    crop_size: Any | None,
    do_resize: bool = True,
    pad_to_square: bool = False,
) -> ResizeCrop:
    """The chain a LLaVA image processor applies to a (height, width) source image."""
    pad_top = pad_left = 0
    padded_height, padded_width = height, width
    if pad_to_square:
        side = max(height, width)
        pad_top, pad_left = (side - height) // 2, (side - width) // 2
        padded_height = padded_width = side
    resized_height, resized_width = (
        resized_size(padded_height, padded_width, size)
        if do_resize
        else (padded_height, padded_width)
    )
    crop_top = crop_left = 0
    view_height, view_width = resized_height, resized_width
    if crop_size is not None:
        view_height, view_width = size_field(crop_size, "height"), size_field(crop_size, "width")
        crop_top = _crop_offset(resized_height, view_height)
        crop_left = _crop_offset(resized_width, view_width)
    return ResizeCrop(
        height,
        width,
        pad_top,
        pad_left,
        padded_height,
        padded_width,
        resized_height,
        resized_width,
        crop_top,
        crop_left,
        view_height,
        view_width,
    )


def grid_box(chain: ResizeCrop, view: str, row: int, col: int, patch_size: int) -> PatchBox:
    """The source rectangle of patch (row, col) of a chain's view."""
    x0, y0 = chain.to_source(col * patch_size, row * patch_size)
    x1, y1 = chain.to_source((col + 1) * patch_size, (row + 1) * patch_size)
    return PatchBox(view, x0, y0, x1, y1)


def cell_boxes(
    view: str, source_height: int, source_width: int, height: int, width: int, cell: int
) -> list[PatchBox]:
    """Row-major boxes of the (cell x cell)-pixel cells of a (height, width) resize of the source."""
    scale_y, scale_x = source_height / height, source_width / width
    return [
        PatchBox(
            view,
            col * cell * scale_x,
            row * cell * scale_y,
            (col + 1) * cell * scale_x,
            (row + 1) * cell * scale_y,
        )
        for row in range(height // cell)
        for col in range(width // cell)
    ]


# ---- anyres: the grid, unpadding, the cap ----------------------------------------------------


def best_resolution(height: int, width: int, grid_pinpoints) -> tuple[int, int]:
    """The (height, width) pinpoint an image is fitted into, by transformers' own rule."""
    # transformers.image_processing_utils loads torch: only when an anyres image is placed
    from transformers.image_processing_utils import select_best_resolution

    return select_best_resolution((height, width), [list(p) for p in grid_pinpoints])


def grid_shape(height: int, width: int, grid_pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of crops of the pinpoint an (height, width) image is fitted into."""
    best_height, best_width = best_resolution(height, width, grid_pinpoints)
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


def max_crops_of(vision_aspect_ratio: str | None) -> int | None:
    """``"anyres_max_9"`` -> 9; ``"anyres"`` (or none) -> no cap."""
    if vision_aspect_ratio and vision_aspect_ratio.startswith("anyres_max_"):
        return int(vision_aspect_ratio.removeprefix("anyres_max_"))
    return None


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


@dataclass(frozen=True)
class AnyresLayout:
    """How an anyres image's high-resolution view is laid out."""

    best_height: int  # the chosen grid pinpoint, in pixels
    best_width: int
    resized_height: int  # the image resized into it, aspect ratio kept
    resized_width: int
    paste_top: int  # padding before the resized image
    paste_left: int
    tiles_high: int
    tiles_wide: int
    cells_per_tile: int  # feature rows (= columns) per tile
    rows: range  # feature-map rows kept after unpadding
    cols: range  # feature-map columns kept after unpadding


def anyres_layout(
    image_height: int,
    image_width: int,
    *,
    grid_pinpoints: list,
    tile_size: int,
    cells_per_tile: int,
) -> AnyresLayout:
    """Best grid, aspect-preserving resize, padding and unpadding, as transformers 5.x does them."""
    best_height, best_width = best_resolution(image_height, image_width, grid_pinpoints)
    # get_patch_output_size
    scale_w, scale_h = best_width / image_width, best_height / image_height
    if scale_w < scale_h:
        resized_width, resized_height = (
            best_width,
            min(math.ceil(image_height * scale_w), best_height),
        )
    else:
        resized_height, resized_width = (
            best_height,
            min(math.ceil(image_width * scale_h), best_width),
        )
    # _get_padding_size: the odd pixel goes after the image
    paste_left, paste_top = (best_width - resized_width) // 2, (best_height - resized_height) // 2
    # the model derives the grid from the pinpoint and the vision tower's input size
    tiles_high, tiles_wide = best_height // tile_size, best_width // tile_size
    rows, cols = unpadded_window(
        image_height, image_width, tiles_high * cells_per_tile, tiles_wide * cells_per_tile
    )
    return AnyresLayout(
        best_height,
        best_width,
        resized_height,
        resized_width,
        paste_top,
        paste_left,
        tiles_high,
        tiles_wide,
        cells_per_tile,
        rows,
        cols,
    )
