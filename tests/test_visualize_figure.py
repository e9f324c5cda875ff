"""The figure drawn from known keep masks, default layers, and the --layers parser."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_models import GRID_PINPOINTS

from pmod_cli.errors import UserError
from pmod_cli.model.families.llava import llava_patch_boxes
from pmod_cli.model.families.llava_next import llava_next_patch_boxes
from pmod_cli.model.schedules import retention_ratios
from pmod_cli.visualization.figure import draw_selection
from pmod_cli.visualization.selection import (
    LayerSelection,
    TokenSelection,
    default_layers,
    parse_layers,
)

SQUARE_56 = {"height": 56, "width": 56}


def next_selection(width: int = 168, height: int = 56) -> TokenSelection:
    """A LLaVA-NeXT-shaped selection: layer 0 dense, layer 1 keeps even tokens, layer 2 the first 8."""
    boxes = llava_next_patch_boxes(
        height,
        width,
        grid_pinpoints=GRID_PINPOINTS,
        tile_size=56,
        patch_size=14,
        size={"shortest_edge": 56},
        crop_size=SQUARE_56,
    )
    count = len(boxes)
    rng = np.random.default_rng(0)
    layers = [
        LayerSelection(0, 1.0, np.ones(count, dtype=bool), None),
        LayerSelection(
            1, 0.5, np.arange(count) % 2 == 0, rng.normal(1.0, 0.1, count).astype(np.float32)
        ),
        LayerSelection(
            2, 0.25, np.arange(count) < 8, rng.normal(1.0, 0.1, count).astype(np.float32)
        ),
    ]
    image = np.full((height, width, 3), 200, dtype=np.uint8)
    return TokenSelection([image], boxes, layers)


def panel(figure, label):
    matches = [axes for axes in figure.axes if axes.get_label() == label]
    assert len(matches) == 1, (
        f"expected one {label!r} panel, found {[a.get_label() for a in figure.axes]}"
    )
    return matches[0]


def rectangles(axes, gid) -> set[tuple[float, ...]]:
    collections = [c for c in axes.collections if c.get_gid() == gid]
    assert len(collections) == 1
    return {
        tuple(
            round(float(v), 3)
            for v in (
                path.vertices[:, 0].min(),
                path.vertices[:, 1].min(),
                path.vertices[:, 0].max(),
                path.vertices[:, 1].max(),
            )
        )
        for path in collections[0].get_paths()
    }


def box_tuple(box) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in (box.x0, box.y0, box.x1, box.y1))


def test_next_figure_has_a_base_and_a_high_res_panel_per_layer_and_the_matrix():
    selection = next_selection()
    figure = draw_selection(selection, [0, 2], matrix=True)
    labels = sorted(axes.get_label() for axes in figure.axes)
    assert labels == sorted(
        ["layer 0 base", "layer 0 high-res", "layer 2 base", "layer 2 high-res", "matrix"]
    )
    assert "dense: all 34 kept" in panel(figure, "layer 0 base").get_title()
    title = panel(figure, "layer 2 high-res").get_title()
    assert "R=0.25" in title and "kept 8/34" in title
    # the first 8 tokens are all base tokens: the high-res view keeps none of its 16 + 2 newlines
    assert "high-res view: 0/16" in title


def test_kept_and_skipped_rectangles_are_the_tokens_boxes():
    selection = next_selection()
    figure = draw_selection(selection, [1])
    for view in ("base", "high-res"):
        axes = panel(figure, f"layer 1 {view}")
        in_view = [
            i for i, box in enumerate(selection.boxes) if box is not None and box.view == view
        ]
        kept = {box_tuple(selection.boxes[i]) for i in in_view if i % 2 == 0}
        skipped = {box_tuple(selection.boxes[i]) for i in in_view if i % 2 == 1}
        assert rectangles(axes, "kept") == kept
        assert rectangles(axes, "skipped") == skipped
    # a dense layer dims nothing
    dense = draw_selection(selection, [0])
    assert rectangles(panel(dense, "layer 0 high-res"), "skipped") == set()


def test_the_unpadded_away_strips_are_marked_uncovered():
    selection = next_selection(width=168, height=56)
    figure = draw_selection(selection, [1])
    # 168x56: high-res rows 1-2 of 4 survive unpadding, original y 5*56/38 .. 33*56/38
    top, bottom = round(5 * 56 / 38, 3), round(33 * 56 / 38, 3)
    assert rectangles(panel(figure, "layer 1 high-res"), "uncovered") == {
        (0, 0, 168, top),
        (0, bottom, 168, 56),
    }
    # the base view squashes the whole image: nothing uncovered
    assert rectangles(panel(figure, "layer 1 base"), "uncovered") == set()


def test_matrix_shows_every_layer_by_vision_token():
    selection = next_selection()
    figure = draw_selection(selection, [2], matrix=True)
    shown = panel(figure, "matrix").images[0].get_array()
    expected = np.stack([layer.kept for layer in selection.layers]).astype(float)
    np.testing.assert_array_equal(np.asarray(shown), expected)


def test_heatmap_colours_patches_by_router_weight():
    selection = next_selection()
    newlines = [i for i, box in enumerate(selection.boxes) if box is None]
    selection.layers[1].weights[newlines] = 5.0  # far outside the patches' range
    figure = draw_selection(selection, [0, 1], heatmap=True, matrix=True)
    axes = panel(figure, "layer 1 base")
    overlay = next(c for c in axes.collections if c.get_gid() == "weights")
    weights = selection.layers[1].weights
    base = [i for i, box in enumerate(selection.boxes) if box is not None and box.view == "base"]
    # scaled min to max over the layer's patches (newline tokens left out), order kept
    patches = np.array([box is not None for box in selection.boxes])
    low, high = weights[patches].min(), weights[patches].max()
    shown = np.asarray(overlay.get_array())
    expected = (weights[base] - low) / (high - low)
    np.testing.assert_allclose(shown, expected, rtol=1e-5)
    assert "no router" in panel(figure, "layer 0 base").get_title()
    assert not [c for c in panel(figure, "layer 0 base").collections if c.get_gid() == "weights"]
    assert any(axes.get_label() == "colorbar" for axes in figure.axes)
    matrix = np.asarray(panel(figure, "matrix").images[0].get_array(), dtype=float)
    assert np.isnan(matrix[0]).all() and not np.isnan(matrix[1:]).any()


def test_llava_figure_is_written_with_one_panel_per_layer(tmp_path):
    boxes = llava_patch_boxes(
        112, 168, patch_size=14, size={"shortest_edge": 56}, crop_size=SQUARE_56
    )
    layers = [
        LayerSelection(i, 0.5, np.arange(16) % 2 == i % 2, np.linspace(0.9, 1.1, 16))
        for i in range(4)
    ]
    selection = TokenSelection([np.zeros((112, 168, 3), dtype=np.uint8)], boxes, layers)
    figure = draw_selection(selection, [1, 3])
    assert sorted(axes.get_label() for axes in figure.axes) == ["layer 1 image", "layer 3 image"]
    # the cropped-away sides are marked: 28 px left and right
    assert rectangles(panel(figure, "layer 1 image"), "uncovered") == {
        (0, 0, 28, 112),
        (140, 0, 168, 112),
    }
    path = tmp_path / "figure.png"
    figure.savefig(path, dpi=50)
    with Image.open(path) as written:
        width, height = figure.get_size_inches() * 50
        assert written.format == "PNG" and written.size == (round(width), round(height))


def test_default_layers_spread_from_the_first_mod_layer_to_the_last():
    # beta 0.5 on 32 layers: dense 0-7, MoD 8-31; four picks at 0, 1/3, 2/3, 1 of the MoD range
    assert default_layers(retention_ratios(32, beta=0.5)) == [8, 16, 23, 31]
    # few MoD layers: all of them
    assert default_layers([1.0, 0.75, 0.25, 0.15]) == [1, 2, 3]
    # the last layer is always shown, even when dense
    assert default_layers([1.0, 0.5, 1.0, 0.5, 1.0]) == [1, 3, 4]


def test_parse_layers():
    assert parse_layers("2, 14,26", 32) == [2, 14, 26]
    assert parse_layers([3, 1, 3], 4) == [3, 1]
    assert parse_layers(None, 4) is None
    with pytest.raises(
        UserError, match=r"layer 32 is out of range; the model has 32 decoder layers \(0-31\)"
    ):
        parse_layers("2,32", 32)
    with pytest.raises(UserError, match="out of range"):
        parse_layers("-1", 32)
    with pytest.raises(UserError, match="comma-separated layer numbers"):
        parse_layers("2,x", 32)
    with pytest.raises(UserError, match="comma-separated layer numbers"):
        parse_layers(" , ", 32)


def test_every_kept_token_is_drawn_also_on_padding():
    """LLaVA-1.5's pad-to-square: the top and bottom token rows of a wide image see only padding;
    kept ones are outlined at full size in a padding band, so the panel shows every kept token."""
    height, width = 56, 168
    boxes = llava_patch_boxes(
        height, width, patch_size=14, size={"shortest_edge": 56}, crop_size=SQUARE_56,
        pad_to_square=True,
    )  # fmt: skip
    kept = np.isin(np.arange(16), [0, 1, 5, 6, 13, 15])  # rows 0 and 3 are padding: 4 of the 6
    layers = [
        LayerSelection(0, 1.0, np.ones(16, dtype=bool), None),
        LayerSelection(1, 0.4, kept, np.linspace(0.9, 1.1, 16)),
    ]
    selection = TokenSelection([np.full((height, width, 3), 200, dtype=np.uint8)], boxes, layers)
    axes = panel(draw_selection(selection, [1]), "layer 1 image")
    outlines = next(c for c in axes.collections if c.get_gid() == "kept").get_paths()
    assert len(outlines) == layers[1].kept_count == 6 and "kept 6/16" in axes.get_title()
    (left, right), (bottom, top) = axes.get_xlim(), axes.get_ylim()
    for path in outlines:
        xs, ys = path.vertices[:, 0], path.vertices[:, 1]
        assert xs.max() - xs.min() == pytest.approx(42) and ys.max() - ys.min() == pytest.approx(42)
        assert left <= xs.min() and xs.max() <= right and top <= ys.min() and ys.max() <= bottom
    on_padding = [
        p for p in outlines if p.vertices[:, 1].max() <= 0 or p.vertices[:, 1].min() >= height
    ]
    assert len(on_padding) == 4
    # the band: 56 px of padding above and below the image, drawn around it
    assert rectangles(axes, "padding") == {(0, -56, 168, 0), (0, 56, 168, 112)}


def test_drawn_kept_boxes_match_the_kept_count_in_both_next_views():
    selection = next_selection()
    figure = draw_selection(selection, [1])
    drawn = sum(
        len(
            next(
                c for c in panel(figure, f"layer 1 {view}").collections if c.get_gid() == "kept"
            ).get_paths()
        )
        for view in ("base", "high-res")
    )
    newlines_kept = sum(
        bool(selection.layers[1].kept[i]) for i, box in enumerate(selection.boxes) if box is None
    )
    assert drawn == selection.layers[1].kept_count - newlines_kept
    # no padding around an image the processor did not pad
    assert rectangles(panel(figure, "layer 1 base"), "padding") == set()
