"""``pmod visualize``: which image patches (and video frames' patches) each p-MoD layer keeps."""

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .options import Device, Json, method_option, output_option

# flags of pmod visualize alone
Images = Annotated[
    list[Path] | None,
    typer.Argument(
        metavar="[IMAGE]...",
        help="The image(s) to route (PNG, JPEG, ...); several go side by side.",
    ),
]
Video = Annotated[
    Path | None,
    typer.Option(
        "--video",
        metavar="FILE",
        help="A video to route (LLaVA-OneVision, Qwen-VL): a frames x layers grid.",
    ),
]
Frames = Annotated[
    int | None,
    typer.Option(
        "--frames",
        metavar="N",
        help="Frames sampled from --video (default: as the checkpoint trained, else 8).",
    ),
]
Checkpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        metavar="DIR",
        help="p-MoD checkpoint directory (default: the tiny default's runs/tiny/sft).",
    ),
]
Layers = Annotated[
    str | None,
    typer.Option(
        "--layers",
        metavar="L,L,...",
        help="Decoder layers to draw, e.g. 2,14,26 (default: 4 MoD layers, first to last).",
    ),
]
Prompt = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        metavar="TEXT",
        help="The question asked with the image (default: Describe the image.).",
    ),
]
Output = Annotated[
    Path | None, output_option("Figure file (default: <image or video stem>_pmod.png).")
]
Matrix = Annotated[
    bool,
    typer.Option("--matrix", help="Add the layers x vision-token matrix (the paper's Figure 6)."),
]
VisualizeMethod = Annotated[
    str | None,
    method_option(
        "One method the checkpoint runs instead of its own routing (draws its kept tokens). "
    ),
]
Heatmap = Annotated[
    bool,
    typer.Option("--heatmap", help="Colour patches by router weight instead of kept/skipped."),
]


def visualize(
    images: Images = None,
    video: Video = None,
    frames: Frames = None,
    checkpoint: Checkpoint = None,
    layers: Layers = None,
    prompt: Prompt = None,
    output: Output = None,
    matrix: Matrix = False,
    heatmap: Heatmap = False,
    method: VisualizeMethod = None,
    device: Device = None,
    as_json: Json = False,
) -> None:
    """Show which image patches (and video frames' patches) each p-MoD layer keeps: a figure and a
    table of kept counts."""
    if not images and video is None:  # checked before the ML stack loads, as Typer's own are
        raise UserError(
            "missing argument 'IMAGE': give one or more images, or --video FILE "
            "(see 'pmod visualize --help')"
        )
    from ..visualization.visualize import kept_table, kept_to_json, visualize_routing

    result = visualize_routing(
        images or [],
        checkpoint=checkpoint,
        layers=layers,
        prompt=prompt,
        output=output,
        matrix=matrix,
        heatmap=heatmap,
        video=video,
        frames=frames,
        device=device,
        method=method,
    )
    if as_json:
        typer.echo(json.dumps(kept_to_json(result)))
        return
    from rich.console import Console

    Console().print(kept_table(result.selection, result.layers))
    if result.selection.answer is not None:
        typer.echo(f"answer: {result.selection.answer}")
    typer.echo(f"figure written to {result.output}")
