"""The ``pmod`` command line: parses arguments and calls into the package, nothing more."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .errors import UserError

app = typer.Typer(
    name="pmod",
    help="p-MoD for LLaVA-family models: convert, train, evaluate, count FLOPs, visualise.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def flops(
    model: str = typer.Option(None, "--model", help="Preset (default llava-next-7b); see docs/flops.md."),
    config: str = typer.Option(None, "--config", help="HF config.json or checkpoint dir, dense or p-MoD."),
    beta: list[float] = typer.Option(None, "--beta", help="PRD shift (default 0.5); repeat to compare."),
    schedule: str = typer.Option(None, "--schedule", help="cosine (PRD), linear, stepped, constant, interleaved."),
    min_ratio: float = typer.Option(None, "--min-ratio", help="Lowest ratio of a MoD layer (default 0.15)."),
    max_ratio: float = typer.Option(None, "--max-ratio", help="Above it a layer stays dense (default 0.85)."),
    vision_tokens: int = typer.Option(None, "--vision-tokens", help="V (default: the largest image layout)."),
    text_tokens: int = typer.Option(None, "--text-tokens", help="T (default 58, as in the paper)."),
    count: str = typer.Option(
        "paper", "--count", help="paper (the paper's profiler) or full (+ attention, vision tower, projector)."
    ),
    dtype: str = typer.Option("bf16", "--dtype", help="KV cache dtype: bf16, fp16, fp32, fp8."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    plot: str = typer.Option(None, "--plot", help="Draw retention ratio vs layer into this PNG."),
) -> None:
    """Count inference TFLOPs and KV cache of p-MoD against the dense model, before training."""
    import json

    from .efficiency.plan import make_plan, plan_to_json

    plan = make_plan(
        model=model,
        config=config,
        betas=beta or (),
        schedule=schedule,
        min_ratio=min_ratio,
        max_ratio=max_ratio,
        vision_tokens=vision_tokens,
        text_tokens=text_tokens,
        count=count,
        dtype=dtype,
    )
    if plot is not None:
        from .efficiency.plot import plot_retention_ratios

        plot_retention_ratios(plan, plot)
    if as_json:
        typer.echo(json.dumps({**plan_to_json(plan), "plot": plot}))
        return
    from .efficiency.report import print_plan

    print_plan(plan)
    if plot is not None:
        typer.echo(f"plot written to {plot}")


@app.command()
def visualize(
    image: Path = typer.Argument(..., help="The image to route (PNG, JPEG, ...)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="p-MoD checkpoint directory (default: the tiny default's runs/tiny/sft)."),
    layers: str = typer.Option(None, "--layers", help="Comma-separated decoder layers, e.g. 2,14,26 (default: 4 MoD layers, first to last)."),
    prompt: str = typer.Option(None, "--prompt", help="The question asked with the image (default: Describe the image.)."),
    output: Path = typer.Option(None, "--output", help="Figure file (default: <image stem>_pmod.png)."),
    matrix: bool = typer.Option(False, "--matrix", help="Add the layers x vision-token matrix (the paper's Figure 6)."),
    heatmap: bool = typer.Option(False, "--heatmap", help="Colour patches by router weight instead of kept/skipped."),
) -> None:
    """Show which image patches each p-MoD layer keeps: a figure and a table of kept counts."""
    from rich.console import Console

    from .visualization.visualize import kept_table, visualize_routing

    result = visualize_routing(
        image, checkpoint=checkpoint, layers=layers, prompt=prompt, output=output, matrix=matrix, heatmap=heatmap
    )
    Console().print(kept_table(result.selection, result.layers))
    typer.echo(f"figure written to {result.output}")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A LLaVA / LLaVA-NeXT checkpoint directory (HF format)."),
    output: Path = typer.Argument(..., help="Where to write the p-MoD checkpoint (a new directory)."),
    beta: float = typer.Option(0.5, "--beta", help="PRD shift: 0.5 keeps layers 0-7 dense at 32 layers."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine (PRD), linear, stepped, constant, interleaved."),
    min_ratio: float = typer.Option(0.15, "--min-ratio", help="Lowest retention ratio of a MoD layer."),
    max_ratio: float = typer.Option(0.85, "--max-ratio", help="Above it a layer stays dense."),
) -> None:
    """Convert a LLaVA checkpoint into a p-MoD one (fresh routers: it computes like the original on kept tokens)."""
    from .model.config import PMoDConfig
    from .model.loading import convert_checkpoint

    try:
        config = PMoDConfig(schedule=schedule, beta=beta, min_ratio=min_ratio, max_ratio=max_ratio)
    except ValueError as err:
        raise UserError(str(err)) from None
    written = convert_checkpoint(source, output, config)
    ratios = config.retention_ratios(_num_layers(written))
    typer.echo(f"wrote {written}: {sum(r < 1 for r in ratios)} of {len(ratios)} layers are MoD")


def _num_layers(checkpoint: Path) -> int:
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    return config["text_config"]["num_hidden_layers"]


def main() -> None:
    try:
        app()
    except UserError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
