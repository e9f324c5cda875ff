"""Terminal tables of an efficiency plan: the summary (dense vs p-MoD) and the per-layer plan."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from rich.console import Console
from rich.table import Table

from .flops import COUNT_MODES, FlopsCount
from .plan import FlopsPlan

COMPONENT_LABELS = {
    "language_model_linear": "LM linear layers",
    "routers": "routers",
    "lm_head": "lm_head",
    "attention_products": "attention (causal)",
    "vision_tower": "vision tower",
    "projector": "projector",
}


def percent(value: float) -> str:
    """0.5375 -> '53.8%': round half up after dropping float noise (0.53749999...)."""
    rounded = Decimal(repr(round(value * 100, 9))).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{rounded}%"


def format_bytes(num_bytes: int) -> str:
    """1536 -> '1.50 KiB' (binary units, as memory is sold)."""
    if num_bytes < 1024:
        return f"{num_bytes} B"
    value = num_bytes / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def _total_tflops(tflops: float) -> str:
    """Two decimals, as the paper prints them; three significant digits for tiny models."""
    return f"{tflops:.2f}" if tflops >= 0.1 else f"{tflops:.3g}"


def _tflops_cell(flops: int) -> str:
    tflops = flops / 1e12
    return "<0.001" if 0 < tflops < 0.0005 else f"{tflops:.3f}"


def _layer_span(layers: list[int]) -> str:
    """[8, 9, 10, 12] -> '8-10, 12'."""
    spans, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            spans.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(spans) or "none"


def _competing_description(result: FlopsCount) -> str:
    if result.routed_tokens == "vision":
        return "vision tokens compete"
    return f"V + {result.prefix_text_tokens} prefix text tokens compete (routed_tokens=all)"


def _subset_cell(result: FlopsCount, num_layers: int) -> str:
    """Which layers process a subset: p-MoD's MoD layers, a baseline's pruned ones."""
    method = result.method
    entering = method.entering_tokens(result.vision_tokens, result.vision_crops)
    if not result.subset_layers and entering != result.vision_tokens:
        return f"none ({entering} vision tokens enter)"
    kind = "MoD" if method.needs_router else "pruned"
    layers = result.mod_layers if method.needs_router else result.subset_layers
    return f"{len(layers)} of {num_layers} {kind} ({_layer_span(layers)})"


def summary_table(plan: FlopsPlan) -> Table:
    """Dense, then each setting of ``plan``: TFLOPs (and where they go), KV cache, MoD layers."""
    first = plan.first
    table = Table(
        title=(
            f"{plan.shape.name}, {first.count} count: prefill of V={first.vision_tokens} + T={first.text_tokens} tokens, "
            f"{_competing_description(first)}"
        ),
    )
    table.add_column("", style="bold")
    table.add_column("dense", justify="right")
    for entry in plan.entries:
        table.add_column(entry.label, justify="right")
    results: list[FlopsCount] = [entry.result for entry in plan.entries]
    _add_flops_rows(table, first, results)
    _add_cache_rows(table, first, results)
    table.caption = _summary_caption(first, results)
    return table


def _add_flops_rows(table: Table, first: FlopsCount, results: list[FlopsCount]) -> None:
    """TFLOPs, the share of dense, and the components (dim)."""
    table.add_row(
        "TFLOPs", _total_tflops(first.baseline_tflops), *(_total_tflops(r.tflops) for r in results)
    )
    table.add_row(
        "  vs dense", "100.0%", *(f"{percent(r.ratio)} (-{percent(1 - r.ratio)})" for r in results)
    )
    for key, label in COMPONENT_LABELS.items():
        if key not in first.components:
            continue
        if key == "vision_tower":
            label = f"{label} x{first.vision_crops}"
        table.add_row(
            f"  {label}",
            _tflops_cell(first.baseline_components[key]),
            *(_tflops_cell(r.components[key]) for r in results),
            style="dim",
        )


def _add_cache_rows(table: Table, first: FlopsCount, results: list[FlopsCount]) -> None:
    """The KV cache (the paper's ratio, then bytes) and the layers that process a subset."""
    table.add_row("KV cache (mean R_l)", "100.0%", *(percent(r.kv_cache_ratio) for r in results))
    if any(not r.method.needs_router for r in results):
        table.add_row(
            "  vs first p-MoD setting",
            "",
            *(f"{r.flops / first.flops - 1:+.1%} TFLOPs" for r in results),
            style="dim",
        )
    table.add_row(
        f"KV bytes ({first.dtype})",
        format_bytes(first.baseline_kv_cache_bytes),
        *(f"{format_bytes(r.kv_cache_bytes)} ({percent(r.kv_cache_bytes_ratio)})" for r in results),
    )
    num_layers = len(first.layers)
    table.add_row(
        "MoD / pruned layers",
        f"0 of {num_layers}",
        *(_subset_cell(r, num_layers) for r in results),
    )


def _summary_caption(first: FlopsCount, results: list[FlopsCount]) -> str:
    kept = (
        "kept vision tokens"
        if first.routed_tokens == "vision"
        else "passing + kept competing tokens"
    )
    caption = (
        f"{COUNT_MODES[first.count]}. KV cache: the paper's convention, mean retention ratio; "
        f"KV bytes: the real cache, {'T + ' if first.routed_tokens == 'vision' else ''}{kept} per layer, K and V."
    )
    others = {r.method.name: r.method for r in results if not r.method.needs_router}
    if others:
        titles = "; ".join(method.title for method in others.values())
        caption += (
            f" Other methods (no router, counted at the first p-MoD setting's plan): {titles}; "
            "their KV cache is the mean share of V kept."
        )
    return caption


def layer_table(plan: FlopsPlan) -> Table:
    first = plan.first
    if first.routed_tokens == "vision":
        title = f"Per-layer plan: kept vision tokens = floor(V * R_l), V={first.vision_tokens}"
        if len(plan.entries) > 1 and any(not e.method.needs_router for e in plan.entries):
            title += "; baselines: their own kept counts (share of V)"
        kept_name = "kept vision"
    else:
        title = (
            f"Per-layer plan: kept competing tokens = floor((V + P) * R_l), V + P = {first.competing_tokens}; "
            f"the other {first.text_tokens - first.prefix_text_tokens} text tokens pass every layer"
        )
        kept_name = "kept competing"
    table = Table(title=title)
    table.add_column("layer", justify="right")
    if len(plan.entries) == 1:
        for name in ("type", "ratio R_l", kept_name, "cached tokens"):
            table.add_column(name, justify="left" if name == "type" else "right")
        for row in first.layers:
            table.add_row(
                str(row.layer),
                row.kind,
                f"{row.ratio:.3f}",
                str(row.kept_competing),
                str(row.tokens),
            )
        return table
    # several settings side by side: one compact column each
    for entry in plan.entries:
        table.add_column(f"{entry.label}\nR_l (kept)", justify="right")
    for index in range(len(first.layers)):
        cells = [str(index)]
        for entry in plan.entries:
            row = entry.result.layers[index]
            shortened = entry.method.prompt_tokens_per_image() is not None
            cells.append(
                "dense"
                if row.kind == "dense" and not shortened
                else f"{row.ratio:.3f} ({row.kept_competing})"
            )
        table.add_row(*cells)
    return table


def print_plan(plan: FlopsPlan, console: Console | None = None) -> None:
    console = console or Console()
    if plan.shape.description:
        console.print(plan.shape.description)
    for entry in plan.entries:
        if entry.calibration is not None:
            measured = entry.calibration
            console.print(measured.description, highlight=False)
            console.print(
                f"  from {measured.data}: per sample {measured.mean_vision_tokens:.1f} vision + "
                f"{measured.mean_text_tokens:.1f} text tokens, {measured.mean_competing_tokens:.1f} competing",
                style="dim",
                highlight=False,
            )
    console.print(summary_table(plan))
    console.print(layer_table(plan))
