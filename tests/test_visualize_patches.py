"""Token index -> image rectangle, checked against transformers' own processors and packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import GRID_PINPOINTS, tiny_model
from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor

from pmod_cli.model.families.geometry import (
    BASE_VIEW,
    HIGH_RES_VIEW,
    IMAGE_VIEW,
    FeatureCell,
    anyres_layout,
    unpadded_window,
)
from pmod_cli.model.families.llava import llava_patch_boxes
from pmod_cli.model.families.llava_next import llava_next_cells
from pmod_cli.visualization.patches import patch_boxes_for

# (width, height): square, wide, tall, odd sizes, extreme ratios, larger than every pinpoint
SIZES = [
    (56, 56),
    (168, 56),
    (56, 168),
    (100, 37),
    (37, 100),
    (250, 200),
    (57, 113),
    (113, 57),
    (20, 90),
    (90, 20),
]


@pytest.fixture(scope="module")
def tiny_llava():
    return tiny_model(layout="llava", layers=2)


@pytest.fixture(scope="module")
def tiny_next():
    return tiny_model(layout="next", layers=2)


def coordinate_image(width: int, height: int) -> Image.Image:
    """R = x, G = y, B = 255: every processed pixel says where it came from (padding has B = 0)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(width)[None, :]
    pixels[..., 1] = np.arange(height)[:, None]
    pixels[..., 2] = 255
    return Image.fromarray(pixels)


def token_pixels(image_processor, image: Image.Image, patch_size: int, cells, tiles_wide: int):
    """For each token, the original (x, y) of the real pixels the vision tower saw in its patch."""
    image_processor.resample = 0  # nearest: pixel values stay coordinates
    values = image_processor(image, return_tensors="pt")["pixel_values"][0].numpy()
    if values.ndim == 3:  # LLaVA-1.5: one crop
        values = values[None]
    mean = np.array(image_processor.image_mean)[:, None, None]
    std = np.array(image_processor.image_std)[:, None, None]
    per_token = []
    for cell in cells:
        if cell.col is None:
            per_token.append(None)
            continue
        if cell.view == HIGH_RES_VIEW:
            tile_row, row = divmod(cell.row, cells_per_tile := values.shape[-1] // patch_size)
            tile_col, col = divmod(cell.col, cells_per_tile)
            crop = 1 + tile_row * tiles_wide + tile_col
        else:
            crop, row, col = 0, cell.row, cell.col
        patch = values[crop][
            :, row * patch_size : (row + 1) * patch_size, col * patch_size : (col + 1) * patch_size
        ]
        patch = np.rint((patch * std + mean) * 255)
        real = patch[2] > 128
        per_token.append((patch[0][real], patch[1][real]))
    return per_token


def assert_boxes_match_pixels(boxes, pixels, width: int, height: int, view_size: int) -> None:
    # nearest resampling may pick a neighbour pixel: allow one source pixel per view pixel, plus one;
    # a patch spans at least 14 view pixels, so a box one patch off still fails
    tol_x = tol_y = max(1.0, max(width, height) / view_size) + 1
    for index, (box, seen) in enumerate(zip(boxes, pixels, strict=True)):
        if seen is None:
            assert box is None, f"token {index}: a newline token got a box"
            continue
        xs, ys = seen
        # every token keeps its rectangle, also over padding (where it reaches past the image)
        assert box.x1 - box.x0 > 1 and box.y1 - box.y0 > 1, f"token {index}: empty box {box}"
        full, box = box, box.on_image(height, width)
        if box is None or box.x1 - box.x0 < 1 or box.y1 - box.y0 < 1:  # a patch of pure padding
            assert len(xs) == 0, f"token {index}: image pixels in the patch of padding box {full}"
            continue
        assert len(xs), f"token {index}: no image pixel in the patch of box {box}"
        assert box.x0 - tol_x <= xs.min() <= box.x0 + tol_x, (index, box, xs.min())
        assert box.x1 - 1 - tol_x <= xs.max() <= box.x1 + tol_x, (index, box, xs.max())
        assert box.y0 - tol_y <= ys.min() <= box.y0 + tol_y, (index, box, ys.min())
        assert box.y1 - 1 - tol_y <= ys.max() <= box.y1 + tol_y, (index, box, ys.max())


@pytest.mark.parametrize("width,height", SIZES)
def test_llava_next_boxes_match_the_processors_pixels(tiny_next, width, height):
    model, processor = tiny_next
    config = model.config
    patch, tile = config.vision_config.patch_size, config.vision_config.image_size
    boxes = patch_boxes_for(processor, config, height, width)
    layout = anyres_layout(
        height, width, grid_pinpoints=GRID_PINPOINTS, tile_size=tile, cells_per_tile=tile // patch
    )
    cells = llava_next_cells(tile // patch, tile // patch, layout)
    pixels = token_pixels(
        processor.image_processor, coordinate_image(width, height), patch, cells, layout.tiles_wide
    )
    assert_boxes_match_pixels(boxes, pixels, width, height, tile)
    # and as many tokens as the processor puts in the prompt
    text = processor(
        images=coordinate_image(width, height), text="<image>\nhi", return_tensors="pt"
    )
    assert len(boxes) == int((text["input_ids"] == config.image_token_id).sum())


@pytest.mark.parametrize("width,height", SIZES)
def test_llava_next_token_order_matches_hf_packing(tiny_next, width, height):
    """Features that encode their (view, row, col) come out of HF's pack_image_features in our order."""
    model, _ = tiny_next
    config = model.config
    cells_per_tile = config.vision_config.image_size // config.vision_config.patch_size
    layout = anyres_layout(
        height,
        width,
        grid_pinpoints=GRID_PINPOINTS,
        tile_size=config.vision_config.image_size,
        cells_per_tile=cells_per_tile,
    )
    hidden = config.text_config.hidden_size
    tiles = layout.tiles_high * layout.tiles_wide
    features = torch.zeros(tiles + 1, cells_per_tile**2, hidden)  # (crops, patches, hidden)
    rows, cols = torch.meshgrid(
        torch.arange(cells_per_tile), torch.arange(cells_per_tile), indexing="ij"
    )
    features[0, :, 1], features[0, :, 2] = rows.flatten(), cols.flatten()
    for tile in range(tiles):  # tiles come in row-major order, as divide_to_patches cuts them
        tile_row, tile_col = divmod(tile, layout.tiles_wide)
        features[1 + tile, :, 0] = 1
        features[1 + tile, :, 1] = tile_row * cells_per_tile + rows.flatten()
        features[1 + tile, :, 2] = tile_col * cells_per_tile + cols.flatten()
    newline = torch.zeros(hidden)
    newline[0] = 2
    packed, _ = model.model.pack_image_features(
        [features], torch.tensor([[height, width]]), "default", image_newline=newline
    )
    ours = llava_next_cells(cells_per_tile, cells_per_tile, layout)
    expected = [
        [0, cell.row, cell.col]
        if cell.view == BASE_VIEW
        else [2, 0, 0]
        if cell.col is None
        else [1, cell.row, cell.col]
        for cell in ours
    ]
    assert packed[0][:, :3].long().tolist() == expected


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize(
    "processor_kind", ["clip", "clip_crop_smaller_than_resize", "llava_pad_to_square"]
)
def test_llava_boxes_match_the_processors_pixels(tiny_llava, processor_kind, width, height):
    model, processor = tiny_llava
    config = model.config
    patch, crop = config.vision_config.patch_size, config.vision_config.image_size
    if processor_kind == "clip_crop_smaller_than_resize":
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 70}, crop_size={"height": crop, "width": crop}
        )
    elif processor_kind == "llava_pad_to_square":  # the official LLaVA-1.5 "pad" aspect mode
        image_processor = LlavaImageProcessor(
            do_pad=True, size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}
        )
    else:
        image_processor = processor.image_processor
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    boxes = patch_boxes_for(processor, config, height, width)
    grid = crop // patch
    cells = [FeatureCell(IMAGE_VIEW, row, col) for row in range(grid) for col in range(grid)]
    pixels = token_pixels(
        processor.image_processor, coordinate_image(width, height), patch, cells, 1
    )
    assert_boxes_match_pixels(boxes, pixels, width, height, crop)


def test_llava_boxes_by_hand():
    # 168x112 -> shortest edge 56: 84x56, centre crop 56 cuts 14 px each side; 14-px patches
    boxes = llava_patch_boxes(
        112, 168, patch_size=14, size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    )
    assert len(boxes) == 16
    # patch (row 1, col 2): resized x 42..56 -> original 84..112, y 14..28 -> 28..56
    assert (boxes[6].x0, boxes[6].y0, boxes[6].x1, boxes[6].y1) == (84, 28, 112, 56)
    # nothing maps into the cropped-away 28 px on either side
    assert min(box.x0 for box in boxes) == 28 and max(box.x1 for box in boxes) == 140
    with_cls = llava_patch_boxes(
        112,
        168,
        patch_size=14,
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        with_cls=True,
    )
    assert with_cls[0] is None and with_cls[1:] == boxes


def test_llava_next_boxes_by_hand(tiny_next):
    """168x56 into pinpoints 56x112 / 112x56 / 112x112, worked out on paper."""
    model, processor = tiny_next
    boxes = patch_boxes_for(processor, model.config, 56, 168)
    # best grid 56x112 (1x2 tiles); resized 112x38, padded 9 px above and below;
    # feature map 4x8; unpadding keeps rows 1-2 (int(round(56 * 8/168)) = 2 rows of content)
    assert len(boxes) == 16 + 2 * (8 + 1)
    base = boxes[:16]
    assert all(box.view == BASE_VIEW for box in base)
    # base view: the whole image squashed to 56x56, 4x4 patches of 42x14 original pixels
    assert (base[10].x0, base[10].y0, base[10].x1, base[10].y1) == (84, 28, 126, 42)
    high_res = boxes[16:]
    assert high_res[8] is None and high_res[17] is None  # a newline ends each row
    # row 1 covers padded y 14..28 -> resized 5..19 -> original * 56/38; col c -> x 21c..21c+21
    first = high_res[0]
    assert first.view == HIGH_RES_VIEW
    assert first.x0 == 0 and first.x1 == pytest.approx(21)
    assert first.y0 == pytest.approx(5 * 56 / 38) and first.y1 == pytest.approx(19 * 56 / 38)
    row2_col5 = high_res[9 + 5]
    assert row2_col5.x0 == pytest.approx(105) and row2_col5.x1 == pytest.approx(126)
    assert row2_col5.y0 == pytest.approx(19 * 56 / 38) and row2_col5.y1 == pytest.approx(
        33 * 56 / 38
    )


@pytest.mark.parametrize(
    "height,width,map_size,rows,cols",
    [
        ((56, 168, (4, 8), range(1, 3), range(0, 8))),  # wide: content rows 2 of 4
        # HF truncates: int(round(40 * 8/112, 7)) = int(2.857) = 2 rows, so rows 0 and 3 go
        # although each holds 6 px of the image
        ((40, 112, (4, 8), range(1, 3), range(0, 8))),
        ((168, 56, (8, 4), range(0, 8), range(1, 3))),  # tall: columns cut
        ((56, 56, (4, 8), range(0, 4), range(2, 6))),  # square into a wide grid
        ((336, 672, (24, 48), range(0, 24), range(0, 48))),  # exact fit: nothing cut
    ],
)
def test_unpadded_window(height, width, map_size, rows, cols):
    assert unpadded_window(height, width, *map_size) == (rows, cols)


# ---- LLaVA-OneVision ----------------------------------------------------------------------


@pytest.mark.parametrize("width,height", SIZES + [(224, 224), (230, 120)])
def test_onevision_boxes_count_what_the_processor_counts(width, height):
    model, processor = tiny_model(layout="onevision", layers=1)
    inputs = processor(
        text=["<image>"], images=[Image.new("RGB", (width, height))], return_tensors="pt"
    )
    tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert len(patch_boxes_for(processor, model.config, height, width)) == tokens


def test_onevision_high_res_tokens_of_a_shrunk_map_cover_larger_cells():
    from pmod_cli.model.families.geometry import FRAME_VIEW
    from pmod_cli.model.families.llava_onevision import (
        onevision_frame_boxes,
        onevision_patch_boxes,
        onevision_several_image_boxes,
    )

    model, processor = tiny_model(layout="onevision", layers=1)
    # 224 x 224: the 4x4 grid of 56 px tiles gives 16 x 16 features, shrunk by anyres_max_9 to 12 x 12
    boxes = onevision_patch_boxes(processor, model.config, 224, 224)
    assert len(boxes) == 16 + 12 * 13
    assert [box.view for box in boxes[:16]] == [BASE_VIEW] * 16
    assert (boxes[0].x0, boxes[0].x1) == (0, 56)  # the base view: 4 x 4 patches of 56 px
    cell = 224 / 12
    first, last_in_row = boxes[16], boxes[16 + 11]
    assert first.view == HIGH_RES_VIEW and (first.x0, first.y0) == (0, 0)
    assert (first.x1, first.y1) == pytest.approx((cell, cell))
    assert (last_in_row.x0, last_in_row.x1) == pytest.approx((11 * cell, 224))
    assert boxes[16 + 12] is None  # the row's newline
    assert (boxes[-2].x1, boxes[-2].y1) == pytest.approx((224, 224)) and boxes[-1] is None
    # one of several images: padded to a square (112 x 56 -> 28 px above and below), one crop of
    # 4 x 4 patches of 28 px, then a newline
    several = onevision_several_image_boxes(processor, model.config, 56, 112)
    assert len(several) == 17 and several[-1] is None
    assert (several[4].x0, several[4].y0, several[4].x1, several[4].y1) == (
        0,
        0,
        28,
        28,
    )  # row 1 starts below the pad
    # a video frame: squashed to one crop, 2 x 2 pooled tokens, each over half the frame
    frame = onevision_frame_boxes(processor, model.config, 50, 70)
    assert [(b.x0, b.y0, b.x1, b.y1) for b in frame] == [
        (0, 0, 35, 25),
        (35, 0, 70, 25),
        (0, 25, 35, 50),
        (35, 25, 70, 50),
    ]
    assert {b.view for b in frame} == {FRAME_VIEW}


def test_llava_pad_to_square_boxes_by_hand():
    # 168x56 padded to 168x168 (56 px above and below), resized to 56x56: 4x4 patches of 42x42
    boxes = llava_patch_boxes(
        56, 168, patch_size=14, size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        pad_to_square=True,
    )  # fmt: skip
    rows = [
        [(box.x0, box.y0, box.x1, box.y1) for box in boxes[row * 4 : row * 4 + 4]]
        for row in range(4)
    ]
    # rows 0 and 3 are pure padding, above and below the image, at their full size
    assert rows[0][1] == (42, -56, 84, -14) and rows[3][2] == (84, 70, 126, 112)
    assert all(boxes[i].on_image(56, 168) is None for i in (*range(4), *range(12, 16)))
    # rows 1 and 2 straddle the image edge: the on-image part is cut at it
    assert rows[1][0] == (0, -14, 42, 28) and boxes[4].on_image(56, 168).y0 == 0
