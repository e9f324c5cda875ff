"""``pmod visualize``: load a p-MoD checkpoint, route one image, draw and tabulate what each layer kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from rich.table import Table

from ..data.llava_data import read_image
from ..errors import UserError
from ..model.loading import load_checkpoint
from ..runtime import resolve_device
from .figure import draw_selection
from .selection import TokenSelection, default_layers, parse_layers, select_tokens

DEFAULT_CHECKPOINT = Path("runs/tiny/sft")
DEFAULT_PROMPT = "Describe the image."
DEFAULT_ANSWER_TOKENS = 64
MAKE_DEFAULT_CHECKPOINT = "pmod pretrain recipes/tiny_pretrain.toml && pmod sft recipes/tiny.toml"


@dataclass
class VisualizeResult:
    selection: TokenSelection
    layers: list[int]  # the layers drawn
    figure: Figure
    output: Path


def _checkpoint_layers(checkpoint: Path | None) -> tuple[Path, int]:
    """The checkpoint to show (the tiny default's when none is given) and its number of layers,
    before the weights load: a bad ``--layers`` fails at once. Any format the loader reads (a LoRA
    adapter directory too)."""
    from ..model.loading import read_num_layers

    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not checkpoint.exists():
            raise UserError(
                f"no checkpoint given and the tiny default's SFT checkpoint {checkpoint} does not exist; "
                f"make it with `{MAKE_DEFAULT_CHECKPOINT}` or pass --checkpoint DIR"
            )
    return Path(checkpoint), read_num_layers(checkpoint)


def _output_path(output: Path | None, image_path: Path) -> Path:
    output = Path(output) if output is not None else Path(f"{Path(image_path).stem}_pmod.png")
    supported = Figure().canvas.get_supported_filetypes()
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in supported:
        raise UserError(
            f"--output {output}: cannot write a {suffix or 'suffix-less'} file; use a .png (or .pdf, .svg) name"
        )
    return output


def visualize_routing(
    image_path: Path,
    *,
    checkpoint: Path | None = None,
    layers: str | Sequence[int] | None = None,
    prompt: str | None = None,
    output: Path | None = None,
    matrix: bool = False,
    heatmap: bool = False,
    device: str | None = None,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
) -> VisualizeResult:
    """Route ``image_path`` through the checkpoint and write the figure; layers like ``"2,14,26"``.
    The model also answers the prompt (``answer_tokens`` at most; 0: no answer) in the same run."""
    image = read_image(image_path)
    output = _output_path(output, image_path)
    checkpoint, num_layers = _checkpoint_layers(checkpoint)
    chosen = parse_layers(layers, num_layers)
    model, processor = load_checkpoint(
        checkpoint, device=resolve_device(device), dtype="auto", require_pmod=True
    )
    selection = select_tokens(model, processor, image, prompt or DEFAULT_PROMPT, answer_tokens)
    if chosen is None:
        chosen = default_layers([layer.ratio for layer in selection.layers])
    figure = draw_selection(selection, chosen, heatmap=heatmap, matrix=matrix)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output, dpi=150)
    except OSError as err:
        raise UserError(f"cannot write {output}: {err.strerror or err}") from None
    return VisualizeResult(selection, chosen, figure, output)


def kept_table(selection: TokenSelection, shown: list[int] | None = None) -> Table:
    """Kept vision tokens per layer: layer, dense/MoD, ratio, kept/total (drawn layers marked)."""
    total = selection.num_vision
    table = Table(title=f"kept vision tokens ({total} in all)")
    table.add_column("layer", justify="right")
    table.add_column("type")
    table.add_column("ratio", justify="right")
    table.add_column("kept/total", justify="right")
    table.add_column("drawn", justify="center")
    for layer in selection.layers:
        table.add_row(
            str(layer.layer),
            "dense" if layer.is_dense else "MoD",
            f"{layer.ratio:.3f}",
            f"{layer.kept_count}/{total}",
            "*" if shown and layer.layer in shown else "",
        )
    return table


def kept_to_json(result: VisualizeResult) -> dict:
    """``pmod visualize --json``: the figure's path and, per layer, what the table shows."""
    total = result.selection.num_vision
    return {
        "figure": str(result.output),
        "answer": result.selection.answer,
        "vision_tokens": total,
        "layers": [
            {
                "layer": layer.layer,
                "type": "dense" if layer.is_dense else "MoD",
                "ratio": layer.ratio,
                "kept": layer.kept_count,
                "drawn": layer.layer in result.layers,
            }
            for layer in result.selection.layers
        ],
    }
