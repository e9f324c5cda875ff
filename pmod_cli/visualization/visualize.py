"""``pmod visualize``: load a p-MoD checkpoint, route one image, draw and tabulate what each layer kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from rich.table import Table

from ..errors import UserError
from ..runtime import resolve_device
from .figure import draw_selection
from .selection import TokenSelection, default_layers, parse_layers, select_tokens

DEFAULT_CHECKPOINT = Path("runs/tiny/sft")
DEFAULT_PROMPT = "Describe the image."
MAKE_DEFAULT_CHECKPOINT = "pmod pretrain recipes/tiny_pretrain.toml && pmod sft recipes/tiny.toml"
PMOD_MODEL_TYPES = ("pmod_llava", "pmod_llava_next")


@dataclass
class VisualizeResult:
    selection: TokenSelection
    layers: list[int]  # the layers drawn
    figure: Figure
    output: Path


def load_image(path: Path) -> Image.Image:
    """The image as RGB, or a UserError naming why it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(
            f"cannot read {path} as an image ({type(err).__name__}); pass a PNG, JPEG or other image file"
        ) from None


def _checkpoint_config(checkpoint: Path | None):
    import transformers

    import pmod_cli  # noqa: F401  (registers the p-MoD model types with the Auto classes)

    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not checkpoint.exists():
            raise UserError(
                f"no checkpoint given and the tiny default's SFT checkpoint {checkpoint} does not exist; "
                f"make it with `{MAKE_DEFAULT_CHECKPOINT}` or pass --checkpoint DIR"
            )
    if not Path(checkpoint).is_dir():
        raise UserError(f"checkpoint directory not found: {checkpoint}")
    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load a model config from {checkpoint}: {first_line}") from None
    if config.model_type not in PMOD_MODEL_TYPES:
        raise UserError(
            f"{checkpoint} holds a {config.model_type!r} model, not a p-MoD one ({', '.join(PMOD_MODEL_TYPES)}); "
            f"pass a checkpoint saved after apply_pmod or trained with pmod sft"
        )
    return Path(checkpoint), config


def load_checkpoint(checkpoint: Path, device: str | None = None):
    """Model (eval mode, on ``device``: CUDA when available) and processor of a p-MoD checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        processor = AutoProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load the processor from {checkpoint} ({type(err).__name__}); save it next to the model "
            f"with processor.save_pretrained"
        ) from None
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype="auto").to(device).eval()
    return model, processor


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
) -> VisualizeResult:
    """Route ``image_path`` through the checkpoint and write the figure; layers like ``"2,14,26"``."""
    image = load_image(image_path)
    output = _output_path(output, image_path)
    checkpoint, config = _checkpoint_config(checkpoint)
    num_layers = config.text_config.num_hidden_layers
    chosen = parse_layers(layers, num_layers)
    model, processor = load_checkpoint(checkpoint, resolve_device(device))
    selection = select_tokens(model, processor, image, prompt or DEFAULT_PROMPT)
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
