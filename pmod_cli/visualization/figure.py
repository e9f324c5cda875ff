"""The figure: per chosen layer, the image with kept patches shown and skipped ones dimmed.

Panels are laid out as a grid: one column per chosen layer, one row per picture and view (one
image: the image, or LLaVA-NeXT's base view then its high-resolution view; several images: each
image's rows in turn, so the images sit side by side across the layers; a video: one row per
sampled frame, a frames x layers grid), and with ``matrix`` a last row spanning all columns with
the paper's Figure 6 (layers x vision-token index). Each panel axes carries the label
``"layer {l} {row}"`` (row: the view, e.g. ``base``, or with several pictures the picture's name,
``image 2``, ``frame 3``, and a view other than ``image`` / ``frame``: ``image 1 base``) and the
matrix ``"matrix"``, so callers and tests can find them; the overlays are collections with gid
``kept``, ``skipped``, ``weights`` (token rectangles in original-image pixels), ``uncovered``
(picture parts outside the view's tokens) and ``padding`` (the band around the picture where
tokens of padding the processor added are drawn).
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import PolyCollection
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import text_to_path
from matplotlib.ticker import MaxNLocator

from .patches import PatchBox
from .selection import LayerSelection, TokenSelection

PANEL_WIDTH_IN = 3.4
MATRIX_HEIGHT_IN = 2.6
SKIPPED_SHADE = (0.0, 0.0, 0.0, 0.68)  # skipped patches: image dimmed under a dark veil
KEPT_EDGE = (0.95, 0.15, 0.1, 0.9)  # kept patches: a thin red outline, as the paper colours them
UNCOVERED_SHADE = (0.55, 0.55, 0.55, 0.55)  # image parts no token of the view covers
UNCOVERED_EDGE = (1.0, 1.0, 1.0, 0.8)  # the hatch colour
WEIGHT_CMAP = "viridis"
UNSEEN_NOTE = "hatched: no token of this view (cropped or unpadded away)"
PADDING_SHADE = (0.78, 0.78, 0.82, 1.0)  # the band of padding the processor added around the image
PADDING_NOTE = "grey band: padding the processor added (its tokens are drawn there)"
LEGEND_FONTSIZE = 8
LEGEND_MARGIN_PT = 8.0  # kept free at each side of the legend lines


def views_of(boxes: list[PatchBox | None]) -> list[tuple[int, str]]:
    """The (picture, view) rows the tokens fall in, in token order (``image``, or ``base`` then
    ``high-res``, for each picture; ``frame`` for a video's frames)."""
    rows: list[tuple[int, str]] = []
    for box in boxes:
        if box is not None and (box.source, box.view) not in rows:
            rows.append((box.source, box.view))
    return rows


def row_label(selection: TokenSelection, source: int, view: str) -> str:
    """``base`` for one image's view; ``image 2``, ``frame 3`` or ``image 1 base`` with several pictures."""
    name = selection.name_of(source)
    if not name:
        return view
    return name if view in ("image", "frame") else f"{name} {view}"


def _rectangles(boxes: list[PatchBox | None], indices) -> list[np.ndarray]:
    rectangles = []
    for index in indices:
        box = boxes[index]
        rectangles.append(
            np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
        )
    return rectangles


def _panel_title(
    selection: LayerSelection, total: int, view: str | None, view_kept: int, view_total: int
) -> str:
    if selection.is_dense:
        head = f"layer {selection.layer} · dense: all {total} kept"
    else:
        head = f"layer {selection.layer} · R={selection.ratio:.2f} · kept {selection.kept_count}/{total}"
    if view is None:
        return head
    # a bare view name ("base") for one image's views; the picture's name ("frame 3") for several
    suffix = " view" if view in ("base", "high-res", "image") else ""
    return f"{head}\n{view}{suffix}: {view_kept}/{view_total}"


def _layer_norm(weights: np.ndarray) -> Normalize:
    """Each layer's own weight range: its bias shifts every weight alike, the spread is what ranks."""
    low, high = float(weights.min()), float(weights.max())
    if high - low < 1e-6:  # a fresh router weighs every token 1
        low, high = low - 1e-3, high + 1e-3
    return Normalize(low, high)


def _strips(outer: tuple, inner: tuple) -> list[np.ndarray]:
    """``outer`` less ``inner`` (rectangles x0, y0, x1, y1; inner within outer): up to four strips."""
    left, top, right, bottom = outer
    x0, y0, x1, y1 = inner
    strips = [
        (left, top, right, y0),
        (left, y1, right, bottom),
        (left, y0, x0, y1),
        (x1, y0, right, y1),
    ]
    return [
        np.array([[a, b], [c, b], [c, d], [a, d]])
        for a, b, c, d in strips
        if c - a > 1e-6 and d - b > 1e-6
    ]


def _uncovered(boxes: list[PatchBox | None], indices, height: int, width: int) -> list[np.ndarray]:
    """The image outside a view's tokens (cropped away, or cut by unpadding): up to four strips.

    A view's tokens form a grid, so together they cover one rectangle.
    """
    x0 = min(max(min(boxes[i].x0 for i in indices), 0), width)
    y0 = min(max(min(boxes[i].y0 for i in indices), 0), height)
    x1 = max(min(max(boxes[i].x1 for i in indices), width), x0)
    y1 = max(min(max(boxes[i].y1 for i in indices), height), y0)
    return _strips((0, 0, width, height), (x0, y0, x1, y1))


def _canvas(boxes: list[PatchBox | None], indices, height: int, width: int) -> tuple:
    """The image and every token of ``indices``: tokens over padding reach beyond the image."""
    return (
        min(0.0, *(boxes[i].x0 for i in indices)),
        min(0.0, *(boxes[i].y0 for i in indices)),
        max(float(width), *(boxes[i].x1 for i in indices)),
        max(float(height), *(boxes[i].y1 for i in indices)),
    )


def _in_view(selection: TokenSelection, source: int, view: str) -> list[int]:
    """The tokens of one picture's view."""
    return [
        i
        for i, box in enumerate(selection.boxes)
        if box is not None and (box.source, box.view) == (source, view)
    ]


def draw_selection(
    selection: TokenSelection, layers: list[int], *, heatmap: bool = False, matrix: bool = False
) -> Figure:
    """The figure for ``layers`` (decoder-layer indices), kept masks or (``heatmap``) router weights."""
    rows = views_of(selection.boxes)
    panel_width = PANEL_WIDTH_IN if len(rows) <= 4 else max(1.8, PANEL_WIDTH_IN * 4 / len(rows))
    heights, padded = _row_heights(selection, rows, panel_width)
    heights += [MATRIX_HEIGHT_IN] if matrix else []
    figure = Figure(
        figsize=(panel_width * len(layers) + (0.8 if heatmap else 0.2), sum(heights)),
        layout="constrained",
    )
    grid = figure.add_gridspec(len(heights), len(layers), height_ratios=heights)
    panel_axes, weight_mappable = _draw_panels(figure, grid, selection, layers, rows, heatmap)
    if matrix:
        matrix_axes = figure.add_subplot(grid[len(rows), :])
        matrix_axes.set_label("matrix")
        _draw_matrix(matrix_axes, selection, heatmap)
    if heatmap and weight_mappable is not None:
        colorbar = figure.colorbar(
            weight_mappable,
            ax=panel_axes,
            shrink=0.8,
            label="router weight, per layer: min to max over its patches",
        )
        colorbar.ax.set_label("colorbar")
    shading = "colour: router weight" if heatmap else "dark: skipped"
    legend = [f"{shading} · red outline: kept · {UNSEEN_NOTE}"] + ([PADDING_NOTE] if padded else [])
    # measured in the legend's font: a one-panel figure wraps each note instead of cutting it
    width = figure.get_figwidth() * 72 - 2 * LEGEND_MARGIN_PT
    figure.suptitle(wrap_to_width(legend, width, LEGEND_FONTSIZE), fontsize=LEGEND_FONTSIZE)
    return figure


def _row_heights(
    selection: TokenSelection, rows: list[tuple[int, str]], panel_width: float
) -> tuple[list[float], bool]:
    """Each row's height in inches (its canvas's aspect, and a title), and whether any canvas
    reaches into padding the processor added."""
    heights, padded = [], False
    for source, view in rows:
        height, width = selection.pictures[source].shape[:2]
        left, top, right, bottom = canvas = _canvas(
            selection.boxes, _in_view(selection, source, view), height, width
        )
        padded = padded or canvas != (0, 0, width, height)
        aspect = (bottom - top) / (right - left)
        heights.append(float(np.clip(panel_width * aspect, 1.2, 6.0)) + 0.5)  # + title
    return heights, padded


def _draw_panels(figure, grid, selection: TokenSelection, layers, rows, heatmap: bool):
    """One panel per layer (column) and row; returns the panels' axes and the last weight
    colour map drawn (None without ``heatmap``)."""
    weight_mappable = None
    panel_axes = []
    for column, layer_index in enumerate(layers):
        for row, (source, view) in enumerate(rows):
            label = row_label(selection, source, view)
            axes = figure.add_subplot(grid[row, column])
            axes.set_label(f"layer {layer_index} {label}")
            mappable = _draw_panel(
                axes,
                selection,
                selection.layers[layer_index],
                source,
                view,
                label if len(rows) > 1 else None,
                heatmap,
            )
            if mappable is not None:
                weight_mappable = mappable
            if column == 0 and len(rows) > 1:
                axes.set_ylabel(label, fontsize=9)
            panel_axes.append(axes)
    return panel_axes, weight_mappable


def wrap_to_width(paragraphs: list[str], width_pt: float, fontsize: float) -> str:
    """Each paragraph on lines of its own, broken at spaces so that no line is wider than
    ``width_pt`` points in the default font at ``fontsize`` (a single longer word stays whole)."""
    font = FontProperties(size=fontsize)

    def fits(line: str) -> bool:
        return text_to_path.get_text_width_height_descent(line, font, ismath=False)[0] <= width_pt

    lines = []
    for paragraph in paragraphs:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and not fits(candidate):
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return "\n".join(lines)


def draw_matrix(selection: TokenSelection, *, heatmap: bool = False) -> Figure:
    """The layers x vision-token matrix alone (the bottom row of ``draw_selection(matrix=True)``)."""
    figure = Figure(figsize=(PANEL_WIDTH_IN * 2, MATRIX_HEIGHT_IN), layout="constrained")
    axes = figure.add_subplot()
    axes.set_label("matrix")
    _draw_matrix(axes, selection, heatmap)
    return figure


def _draw_panel(
    axes,
    selection: TokenSelection,
    layer: LayerSelection,
    source: int,
    view: str,
    row: str | None,
    heatmap: bool,
):
    """One layer on one picture's view: the picture in its padding, then the overlays; returns
    the weight overlay if drawn. Tokens over padding are drawn there, so every kept token shows."""
    picture = selection.pictures[source]
    height, width = picture.shape[:2]
    in_view = _in_view(selection, source, view)
    left, top, right, bottom = canvas = _canvas(selection.boxes, in_view, height, width)
    padding = PolyCollection(
        _strips(canvas, (0, 0, width, height)), facecolors=[PADDING_SHADE], edgecolors="none"
    )
    padding.set_gid("padding")
    axes.add_collection(padding)
    axes.imshow(picture, extent=(0, width, height, 0))
    axes.set_xticks([])
    axes.set_yticks([])
    kept = [i for i in in_view if layer.kept[i]]
    overlay, weight_range = _draw_tokens(axes, selection, layer, in_view, kept, heatmap)
    unseen = PolyCollection(
        _uncovered(selection.boxes, in_view, height, width),
        facecolors=[UNCOVERED_SHADE],
        edgecolors=[UNCOVERED_EDGE],
        hatch="//",
        linewidths=0.0,
    )
    unseen.set_gid("uncovered")
    axes.add_collection(unseen)
    axes.set_xlim(left, right)
    axes.set_ylim(bottom, top)  # image convention: y grows downwards
    title = _panel_title(layer, selection.num_vision, row, len(kept), len(in_view))
    if heatmap:
        title += (
            " · no router"
            if layer.is_dense
            else f" · w {weight_range[0]:.3f}-{weight_range[1]:.3f}"
        )
    axes.set_title(title, fontsize=8)
    return overlay


def _draw_tokens(axes, selection: TokenSelection, layer: LayerSelection, in_view, kept, heatmap):
    """Skipped tokens veiled (or every token coloured by router weight), kept ones outlined;
    returns the weight overlay (None without one) and the weight range it spans."""
    boxes = selection.boxes
    if heatmap and not layer.is_dense:
        # scaled over the layer's image patches: newline tokens' weights would stretch the range
        patch_weights = layer.weights[[i for i, box in enumerate(boxes) if box is not None]]
        overlay = PolyCollection(
            _rectangles(boxes, in_view),
            array=_layer_norm(patch_weights)(layer.weights[in_view]),
            cmap=WEIGHT_CMAP,
            norm=Normalize(0.0, 1.0),
            alpha=0.65,
            edgecolors="none",
        )
        overlay.set_gid("weights")
        axes.add_collection(overlay)
        weight_range = (float(patch_weights.min()), float(patch_weights.max()))
    else:
        overlay, weight_range = None, None
        skipped = [i for i in in_view if not layer.kept[i]]
        veil = PolyCollection(
            _rectangles(boxes, skipped), facecolors=[SKIPPED_SHADE], edgecolors="none"
        )
        veil.set_gid("skipped")
        axes.add_collection(veil)
    outline = PolyCollection(
        _rectangles(boxes, kept), facecolors="none", edgecolors=[KEPT_EDGE], linewidths=0.4
    )
    outline.set_gid("kept")
    axes.add_collection(outline)
    return overlay, weight_range


def _draw_matrix(axes, selection: TokenSelection, heatmap: bool) -> None:
    """The paper's Figure 6: decoder layers (rows) by vision-token index (columns)."""
    num_layers = len(selection.layers)
    if heatmap:
        values = np.full((num_layers, selection.num_vision), np.nan)
        for layer in selection.layers:
            if layer.weights is not None:
                values[layer.layer] = _layer_norm(layer.weights)(layer.weights)
        cmap = colormaps[WEIGHT_CMAP].with_extremes(bad="#bbbbbb")  # NaN rows: dense layers
        axes.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0, vmax=1.0)
        axes.set_title(
            "router weight per layer (min to max) and vision token; grey: dense layer, no router",
            fontsize=9,
        )
    else:
        values = np.stack([layer.kept for layer in selection.layers]).astype(
            float
        )  # (layers, n_vision)
        axes.imshow(
            values,
            aspect="auto",
            interpolation="nearest",
            cmap=ListedColormap(["#2b2b2b", "#f03c1e"]),
            vmin=0,
            vmax=1,
        )
        axes.set_title("kept (red) / skipped (dark) per layer and vision token", fontsize=9)
    rows = [(box.source, box.view) if box is not None else None for box in selection.boxes]
    for index in range(1, len(rows)):
        if (
            rows[index] is not None
            and rows[index - 1] is not None
            and rows[index] != rows[index - 1]
        ):
            axes.axvline(
                index - 0.5, color="white", linewidth=1.0
            )  # base | high-res, image | image, frame | frame
    axes.set_xlabel("vision-token index")
    axes.set_ylabel("layer")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # few layers: no ticks at 0.5
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
