"""Retention ratio against layer, one curve per p-MoD setting (like the paper's Figures 2 and 4)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..model.schedules import SCHEDULES
from .plan import FlopsPlan
from .report import percent


def plot_retention_ratios(plan: FlopsPlan, path: str | Path) -> Path:
    """Draw each setting's per-layer ratios (solid) over its raw schedule (dashed) into ``path``."""
    # the object API with the Agg canvas: no pyplot state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write the plot {path}: directory {path.parent} does not exist")
    figure = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    num_layers = plan.shape.text.num_layers
    layers = list(range(num_layers))
    for entry in plan.entries:
        result, pmod = entry.result, entry.pmod
        label = f"{entry.label}: {result.tflops:.2f} TFLOPs ({result.count} count), KV {percent(result.kv_cache_ratio)}"
        (line,) = axes.plot(layers, result.retention_ratios, marker="o", markersize=3, label=label)
        if pmod.ratios is None and entry.calibration is None and entry.method.needs_router:
            # the schedule before thresholds, as drawn in the paper (measured ratios have none)
            raw = [SCHEDULES[pmod.schedule](layer, num_layers, pmod.beta) for layer in layers]
            axes.plot(layers, raw, linestyle="--", linewidth=0.8, color=line.get_color(), alpha=0.6)
    first = plan.entries[0].pmod
    for threshold, name in ((first.max_ratio, "max"), (first.min_ratio, "min")):
        axes.axhline(threshold, color="grey", linestyle=":", linewidth=0.8)
        axes.annotate(
            f"{name} {threshold:g}",
            (num_layers - 1, threshold),
            fontsize=7,
            color="grey",
            ha="right",
            va="bottom",
        )
    axes.set_ylim(0.0, 1.05)
    axes.set_xlim(-0.5, num_layers - 0.5)
    axes.set_xlabel("decoder layer $l$")
    axes.set_ylabel("retention ratio $R_l$ (1 = dense)")
    axes.set_title(
        f"{plan.shape.name}: {'vision' if plan.first.routed_tokens == 'vision' else 'competing'}-token retention "
        "per layer (dashed: schedule before thresholds)",
        fontsize=9,
    )
    axes.legend(fontsize=7, loc="lower left")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except ValueError as err:  # e.g. an extension matplotlib cannot write
        raise UserError(f"cannot write the plot {path}: {err}") from None
    return path
