"""How ``pmod arank`` shows its result: a table per layer and a bar plot of ARank per layer."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..errors import UserError
from .arank import ARankResult

DENSE_COLOUR = "tab:blue"
MOD_COLOUR = "tab:orange"


def arank_table(result: ARankResult) -> Table:
    """Layer, ARank, mean map size, the checkpoint's layer type (p-MoD only) and the proposal."""
    already_mod = set(result.checkpoint_mod_layers)
    table = Table(
        title=f"ARank per layer: {result.model}, {result.samples} samples, {result.dtype} maps"
    )
    table.add_column("layer", justify="right")
    table.add_column("ARank", justify="right")
    table.add_column("tokens", justify="right")
    if already_mod:
        table.add_column("checkpoint")
    table.add_column("proposed")
    dense = set(result.dense_layers)
    for layer, (rank, tokens) in enumerate(zip(result.arank, result.tokens, strict=True)):
        row = [str(layer), f"{rank:.1f}", f"{tokens:.1f}"]
        if already_mod:
            row.append("MoD (kept tokens)" if layer in already_mod else "dense")
        row.append("[bold]dense[/bold]" if layer in dense else "MoD")
        table.add_row(*row)
    table.caption = (
        f"the {len(result.dense_layers)} highest-ARank layers stay dense; "
        f"MoD layers: {format_layers(result.mod_layers)}"
    )
    tied = tied_at_cut(result)
    if tied:
        table.caption += (
            f"; layers {format_layers(tied)} tie at the cut, the earlier ones stay dense"
        )
    return table


def tied_at_cut(result: ARankResult) -> list[int]:
    """The layers sharing the ARank where dense and MoD meet (the proposal among them is by order)."""
    if not result.dense_layers or not result.mod_layers:
        return []
    cut = min(result.arank[layer] for layer in result.dense_layers)
    if max(result.arank[layer] for layer in result.mod_layers) < cut:
        return []
    return [layer for layer, rank in enumerate(result.arank) if rank == cut]


def format_layers(layers: list[int]) -> str:
    """[3, 4, 5, 7] -> '3-5, 7'."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return (
        ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs) or "none"
    )


def check_plot_path(path: str | Path) -> Path:
    """``path`` if matplotlib can write its format; checked before the (long) measurement."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FigureCanvasAgg.get_supported_filetypes():
        raise UserError(
            f"--output {path}: cannot write a {suffix or 'suffix-less'} file; use a .png (or .pdf, .svg) name"
        )
    return path


def report_arank(
    result: ARankResult, output: str | Path, save: str | Path | None = None, as_json: bool = False
) -> None:
    """Draw the plot, write the result file if asked, and print the table (or one JSON object)."""
    import json

    from rich.console import Console

    plot = plot_arank(result, output)
    saved = result.save(save) if save is not None else None
    if as_json:
        print(
            json.dumps(
                {**result.to_dict(), "plot": str(plot), "saved": str(saved) if saved else None}
            )
        )
        return
    console = Console()
    console.print(arank_table(result))
    # plain lines, never wrapped: paths stay whole and copyable
    notes = []
    if result.skipped:
        notes.append(
            f"{result.skipped} samples without an image or a parseable conversation were skipped"
        )
    notes.append(f"plot written to {plot}")
    if saved is not None:
        notes.append(f"ARank result written to {saved}")
    notes.append(
        f"recipe: mod_layers = {result.mod_layers}"
    )  # a line to paste into a recipe's [pmod]
    for note in notes:
        console.print(note, markup=False, highlight=False, soft_wrap=True)


def plot_arank(result: ARankResult, path: str | Path) -> Path:
    """Bars of ARank per layer, coloured by the proposal; hatched where the checkpoint was MoD."""
    # the object API with the Agg canvas: no pyplot state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = check_plot_path(path)
    figure = Figure(figsize=(max(6.0, 0.28 * len(result.arank) + 2), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    dense = set(result.dense_layers)
    already_mod = set(result.checkpoint_mod_layers)
    layers = list(range(len(result.arank)))
    axes.bar(
        layers,
        result.arank,
        color=[DENSE_COLOUR if layer in dense else MOD_COLOUR for layer in layers],
        edgecolor="black",
        linewidth=0.4,
    )
    for layer in already_mod:  # hatch separately: bar() takes one hatch for all bars
        axes.bar(
            layer, result.arank[layer], color="none", hatch="//", edgecolor="black", linewidth=0.4
        )
    _add_legend(axes, hatched=bool(already_mod))
    axes.set_xticks(layers)
    axes.tick_params(axis="x", labelsize=7)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("ARank (mean over heads, samples)")
    axes.set_title(
        f"{Path(result.model).name}: ARank per layer ({result.samples} samples)", fontsize=9
    )
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=130)
    except OSError as err:
        raise UserError(f"cannot write the plot {path}: {err.strerror or err}") from None
    return path


def _add_legend(axes, hatched: bool) -> None:
    """The proposal's colours (and the hatch of the checkpoint's MoD layers), below the axes:
    the bars reach the top."""
    from matplotlib.patches import Patch

    handles = [
        Patch(color=DENSE_COLOUR, label="proposed dense"),
        Patch(color=MOD_COLOUR, label="proposed MoD"),
    ]
    if hatched:
        handles.append(
            Patch(
                facecolor="white",
                edgecolor="black",
                hatch="//",
                label="MoD in checkpoint (kept tokens)",
            )
        )
    axes.legend(
        handles=handles,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=len(handles),
        frameon=False,
    )
