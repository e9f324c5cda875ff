"""What the page shows besides the answers: the kept-patch overlay, the matrix, the efficiency table.

The pictures are ``pmod visualize``'s own drawings (``visualization.figure``) rendered to images;
the numbers are ``pmod chat``'s measurements, formatted as its efficiency line formats them.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence

from matplotlib.figure import Figure
from PIL import Image

from ..efficiency.report import format_bytes, percent
from ..visualization.figure import draw_matrix, draw_selection
from ..visualization.selection import TokenSelection
from .engine import MethodRun

FIGURE_DPI = 100


def figure_image(figure: Figure, dpi: int = FIGURE_DPI) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def overlay_figure(selection: TokenSelection, layer: int) -> Figure:
    """The image with layer ``layer``'s kept patches outlined and its skipped ones dimmed, the
    legend above it wrapped to the one panel's width."""
    return draw_selection(selection, [layer])


def overlay_image(selection: TokenSelection, layer: int) -> Image.Image:
    """``overlay_figure`` as the page shows it."""
    return figure_image(overlay_figure(selection, layer))


def matrix_image(selection: TokenSelection) -> Image.Image:
    """Kept (red) / skipped (dark) per layer and vision token."""
    return figure_image(draw_matrix(selection))


def default_layer(ratios: Sequence[float]) -> int:
    """The first layer that routes (the earliest choice made), else the last layer."""
    return next((index for index, ratio in enumerate(ratios) if ratio < 1.0), len(ratios) - 1)


# (metric key, row title); the keys are the table cells' data-metric attributes
EFFICIENCY_ROWS = (
    ("prompt_tokens", "prompt tokens"),
    ("tflops", "TFLOPs (prefill)"),
    ("kv_cache", "KV cache after prefill"),
    ("prefill", "prefill latency"),
    ("end_to_end", "end-to-end latency"),
    ("generated", "generated tokens"),
)


def efficiency_cells(run: MethodRun) -> dict[str, str]:
    """One run's column of the efficiency table."""
    answer = run.answer
    flops = answer.flops
    return {
        "prompt_tokens": f"{answer.vision_tokens} vision + {answer.text_tokens} text",
        "tflops": f"{flops.tflops:.3g} ({percent(flops.tflops / flops.baseline_tflops)} of dense)",
        "kv_cache": (
            f"{format_bytes(answer.kv_cache_bytes)} "
            f"({percent(answer.kv_cache_bytes / answer.dense_kv_cache_bytes)} of dense)"
        ),
        "prefill": f"{answer.prefill_s:.3f} s",
        "end_to_end": f"{answer.end_to_end_s:.2f} s",
        "generated": str(answer.generated_tokens),
    }


def efficiency_table(runs: Sequence[MethodRun]) -> str:
    """The request's costs, one column per method, as an HTML table."""
    if not runs:
        return ""
    head = "".join(
        f'<th data-method="{html.escape(run.method.name)}">{html.escape(run.method.label)}</th>'
        for run in runs
    )
    columns = [(run.method.name, efficiency_cells(run)) for run in runs]
    body = []
    for key, title in EFFICIENCY_ROWS:
        cells = "".join(
            f'<td data-method="{html.escape(name)}" data-metric="{key}">{html.escape(cells[key])}</td>'
            for name, cells in columns
        )
        body.append(f"<tr><th scope='row'>{html.escape(title)}</th>{cells}</tr>")
    note = "TFLOPs: the paper's count (pmod flops); dense: the same weights, every layer dense."
    return (
        f'<table class="pmod-efficiency"><thead><tr><th></th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table><p><small>{note}</small></p>"
    )
