"""Where each vision token comes from: token index -> rectangle on the ORIGINAL image.

Pure functions that replay the HF image processors' geometry (transformers 5.x) backwards, so
the overlay sits on the picture the user gave, not on the resized crop the model saw.

LLaVA-1.5 (``CLIPImageProcessor`` / ``LlavaImageProcessor``): optional pad-to-square, resize
(shortest edge or fixed size), center crop; token j is patch (j // grid, j % grid) of the crop.

LLaVA-NeXT (``LlavaNextImageProcessor`` + ``LlavaNextModel.pack_image_features``): first the
base view (the whole image squashed to a square crop), then the high-resolution view: the image
is resized (aspect kept) into the best grid of ``image_grid_pinpoints``, padded to it, cut into
tiles; the tiles' patch features form one (grid_h * cells, grid_w * cells) map whose padding
rows or columns are cut away ("unpadding") and after each remaining row comes one learned
newline token, which has no place on the image (``None``).

LLaVA-OneVision (``LlavaOnevisionImageProcessor`` / ``VideoProcessor`` + ``LlavaOnevisionModel``):
an image alone is LLaVA-NeXT's layout with the base view squashed to the crop size and the
unpadded map shrunk (bilinear) to about 9 crops when larger, so a high-res token then covers a
proportionally larger cell; one of several images is padded to a square and squashed to one crop,
then a newline; a video frame is squashed to one crop whose features are pooled 2x2, and one
newline closes the video. ``PatchBox.source`` says which picture (image or frame) a box lies on.
Where a processor pads (LLaVA-1.5's pad-to-square, a center crop larger than the resized image,
the padding around a LLaVA-NeXT grid that unpadding does not cut), a token's rectangle reaches
beyond the image: its coordinates run below 0 or past the width or height, so a token of pure
padding keeps its full size and place, and the figure can draw it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transformers.image_processing_utils import select_best_resolution

from ..errors import UserError
from ..model.families.anyres import capped_map_size, max_crops_of, unpadded_window

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


def _size_field(size: Any, key: str) -> int | None:
    # processors hold a SizeDict; a raw dict comes from older saved configs
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def resized_size(height: int, width: int, size: Any) -> tuple[int, int]:
    """(height, width) after the processor's ``resize`` with ``size`` (shortest edge or fixed)."""
    fixed_height, fixed_width = _size_field(size, "height"), _size_field(size, "width")
    if fixed_height and fixed_width:
        return fixed_height, fixed_width
    shortest = _size_field(size, "shortest_edge")
    if shortest is None or _size_field(size, "longest_edge"):
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
        view_height, view_width = _size_field(crop_size, "height"), _size_field(crop_size, "width")
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


def _grid_box(chain: ResizeCrop, view: str, row: int, col: int, patch_size: int) -> PatchBox:
    x0, y0 = chain.to_source(col * patch_size, row * patch_size)
    x1, y1 = chain.to_source((col + 1) * patch_size, (row + 1) * patch_size)
    return PatchBox(view, x0, y0, x1, y1)


# ---- LLaVA-1.5 ---------------------------------------------------------------------------


def llava_patch_boxes(
    image_height: int,
    image_width: int,
    *,
    patch_size: int,
    size: Any,
    crop_size: Any | None,
    do_resize: bool = True,
    pad_to_square: bool = False,
    with_cls: bool = False,
) -> list[PatchBox | None]:
    """One box per LLaVA-1.5 vision token, in token order (``None`` for a kept CLS token)."""
    chain = resize_crop(
        image_height,
        image_width,
        size=size,
        crop_size=crop_size,
        do_resize=do_resize,
        pad_to_square=pad_to_square,
    )
    rows, cols = chain.view_height // patch_size, chain.view_width // patch_size
    boxes: list[PatchBox | None] = [None] if with_cls else []
    boxes += [
        _grid_box(chain, IMAGE_VIEW, row, col, patch_size)
        for row in range(rows)
        for col in range(cols)
    ]
    return boxes


# ---- LLaVA-NeXT --------------------------------------------------------------------------


@dataclass(frozen=True)
class AnyresLayout:
    """How LLaVA-NeXT lays out one image's high-resolution view."""

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
    best_height, best_width = select_best_resolution((image_height, image_width), grid_pinpoints)
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
    # base view: the whole image squashed to a square, then the usual resize and crop
    fixed_height, fixed_width = _size_field(size, "height"), _size_field(size, "width")
    squash = (
        (fixed_height, fixed_width)
        if fixed_height and fixed_width
        else (_size_field(size, "shortest_edge"),) * 2
    )
    base_chain = resize_crop(
        squash[0], squash[1], size=size, crop_size=crop_size, do_resize=do_resize
    )
    to_squash_x, to_squash_y = image_width / squash[1], image_height / squash[0]
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

    def base_box(row: int, col: int) -> PatchBox:
        box = _grid_box(base_chain, BASE_VIEW, row, col, patch_size)
        return PatchBox(
            BASE_VIEW,
            box.x0 * to_squash_x,
            box.y0 * to_squash_y,
            box.x1 * to_squash_x,
            box.y1 * to_squash_y,
        )

    base_rows, base_cols = base_chain.view_height // patch_size, base_chain.view_width // patch_size
    boxes: list[PatchBox | None] = []
    for cell in llava_next_cells(base_rows, base_cols, layout):
        if cell.view == BASE_VIEW:
            boxes.append(base_box(cell.row, cell.col))
        elif cell.col is None:
            boxes.append(None)
        else:
            boxes.append(high_res_box(cell.row, cell.col))
    return boxes


# ---- LLaVA-OneVision ----------------------------------------------------------------------


def _square_size(processor_part) -> int:
    """The fixed square size OneVision's image and video processors resize to."""
    size = processor_part.size
    height, width = _size_field(size, "height"), _size_field(size, "width")
    if not height or height != width:
        raise UserError(
            f"pmod visualize maps OneVision tokens for a square processor size, not {size}"
        )
    return height


def onevision_patch_boxes(
    processor, config, image_height: int, image_width: int
) -> list[PatchBox | None]:
    """One box per vision token of an image alone (anyres_max_9), in token order; ``None`` for the
    row newlines. The high-res map may have been shrunk: a token covers its share of the map."""
    patch, tile = config.vision_config.patch_size, config.vision_config.image_size
    if _square_size(processor.image_processor) != tile:
        raise UserError(
            "pmod visualize maps OneVision tokens when the processor's crop size is the tower's input size"
        )
    side = tile // patch
    base_chain = resize_crop(
        image_height, image_width, size={"height": tile, "width": tile}, crop_size=None
    )
    boxes: list[PatchBox | None] = [
        _grid_box(base_chain, BASE_VIEW, r, c, patch) for r in range(side) for c in range(side)
    ]
    layout = anyres_layout(
        image_height,
        image_width,
        grid_pinpoints=config.image_grid_pinpoints,
        tile_size=tile,
        cells_per_tile=side,
    )
    rows, cols = layout.rows, layout.cols
    map_height, map_width = capped_map_size(
        len(rows), len(cols), side, max_crops_of(config.vision_aspect_ratio)
    )
    row_step, col_step = len(rows) / map_height, len(cols) / map_width  # map cells per token
    unresize_x, unresize_y = (
        image_width / layout.resized_width,
        image_height / layout.resized_height,
    )

    def to_image(col: float, row: float) -> tuple[float, float]:
        # tiles go to the tower at their own size: one map cell is one patch of the padded image
        return (col * patch - layout.paste_left) * unresize_x, (
            row * patch - layout.paste_top
        ) * unresize_y

    for row in range(map_height):
        for col in range(map_width):
            x0, y0 = to_image(cols.start + col * col_step, rows.start + row * row_step)
            x1, y1 = to_image(cols.start + (col + 1) * col_step, rows.start + (row + 1) * row_step)
            boxes.append(PatchBox(HIGH_RES_VIEW, x0, y0, x1, y1))
        boxes.append(None)  # the row's newline token
    return boxes


def onevision_several_image_boxes(
    processor, config, image_height: int, image_width: int
) -> list[PatchBox | None]:
    """An image among several: padded to a square, squashed to one crop, then one newline."""
    patch, side = config.vision_config.patch_size, _square_size(processor.image_processor)
    chain = resize_crop(
        image_height,
        image_width,
        size={"height": side, "width": side},
        crop_size=None,
        pad_to_square=True,
    )
    cells = side // patch
    return [
        _grid_box(chain, IMAGE_VIEW, r, c, patch) for r in range(cells) for c in range(cells)
    ] + [None]


def onevision_frame_boxes(processor, config, frame_height: int, frame_width: int) -> list[PatchBox]:
    """One video frame: squashed to one crop, its features pooled to ceil(cells / 2) per side."""
    patch, side = config.vision_config.patch_size, _square_size(processor.video_processor)
    chain = resize_crop(
        frame_height, frame_width, size={"height": side, "width": side}, crop_size=None
    )
    cells = side // patch
    pooled = math.ceil(cells / 2)
    step = cells / pooled * patch  # view pixels per pooled token
    boxes = []
    for row in range(pooled):
        for col in range(pooled):
            x0, y0 = chain.to_source(col * step, row * step)
            x1, y1 = chain.to_source((col + 1) * step, (row + 1) * step)
            boxes.append(PatchBox(FRAME_VIEW, x0, y0, x1, y1))
    return boxes


# ---- from a loaded processor and model config --------------------------------------------


def processor_geometry(processor, model_config) -> dict[str, Any]:
    """The image processor's resize / crop settings and the tower's patch size."""
    image_processor = processor.image_processor
    return dict(
        patch_size=model_config.vision_config.patch_size,
        size=image_processor.size,
        crop_size=image_processor.crop_size
        if getattr(image_processor, "do_center_crop", False)
        else None,
        do_resize=bool(getattr(image_processor, "do_resize", True)),
    )


def patch_boxes_for(
    processor, model_config, image_height: int, image_width: int
) -> list[PatchBox | None]:
    """The boxes of every vision token the processor and model make of a (height, width) image:
    the model's family knows its token layout."""
    from ..model.families import family_for_config

    return family_for_config(model_config).patch_boxes(
        processor, model_config, image_height, image_width
    )


# ---- Qwen-VL (dynamic resolution) ----------------------------------------------------------


def qwen_vl_patch_boxes(processor, config, image_height: int, image_width: int) -> list[PatchBox]:
    """Qwen2.5-VL / Qwen3-VL: the image is resized (aspect kept, no pad or crop) to multiples of
    patch * merge within the processor's pixel limits, and each merged token covers one
    (patch * merge)-pixel cell of it, row by row."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    height, width = smart_resize(
        image_height,
        image_width,
        factor=factor,
        min_pixels=image_processor.size["shortest_edge"],
        max_pixels=image_processor.size["longest_edge"],
    )
    return _cell_boxes(IMAGE_VIEW, image_height, image_width, height, width, factor)


def qwen_vl_frame_boxes(
    processor, config, frame_height: int, frame_width: int, frames: int = 2
) -> list[PatchBox]:
    """One temporal patch (``temporal_patch_size`` frames) of a video: its frames resized as the
    video processor does (Qwen3-VL caps the pixels of all ``frames`` together), one token per
    (patch * merge)-pixel cell."""
    video_processor = processor.video_processor
    factor = video_processor.patch_size * video_processor.merge_size
    limits = dict(
        min_pixels=video_processor.size["shortest_edge"],
        max_pixels=video_processor.size["longest_edge"],
    )
    if config.model_type.endswith("qwen3_vl"):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        height, width = smart_resize(
            frames,
            frame_height,
            frame_width,
            temporal_factor=video_processor.temporal_patch_size,
            factor=factor,
            **limits,
        )
    else:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

        height, width = smart_resize(frame_height, frame_width, factor=factor, **limits)
    return _cell_boxes(FRAME_VIEW, frame_height, frame_width, height, width, factor)


def _cell_boxes(
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
