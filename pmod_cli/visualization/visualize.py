"""``pmod visualize``: load a p-MoD checkpoint, route one or several images and/or a video, draw
and tabulate what each layer kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from rich.table import Table

from ..data.llava_data import read_image
from ..data.video import VideoError, check_video, read_frames
from ..errors import UserError
from ..model.families import family_for_model_type
from ..model.loading import load_checkpoint, read_model_type, read_num_layers
from ..model.methods import TokenMethod, parse_method
from ..model.modeling import apply_method
from ..runtime import resolve_device
from .figure import draw_selection
from .selection import TokenSelection, default_layers, parse_layers, select_tokens

DEFAULT_CHECKPOINT = Path("runs/tiny/sft")
DEFAULT_PROMPT = "Describe the image."
DEFAULT_VIDEO_PROMPT = "Describe the video."
# frames sampled from a video when the checkpoint's video processor does not say (data.video_frames)
DEFAULT_FRAMES = 8
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
    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not checkpoint.exists():
            raise UserError(
                f"no checkpoint given and the tiny default's SFT checkpoint {checkpoint} does not exist; "
                f"make it with `{MAKE_DEFAULT_CHECKPOINT}` or pass --checkpoint DIR"
            )
    return Path(checkpoint), read_num_layers(checkpoint)


def load_video(path: Path, num_frames: int | None = None):
    """``num_frames`` frames of the video at ``path`` (None: only check that it opens), or a
    UserError naming why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"video not found: {path}"
            if not path.exists()
            else f"{path} is a directory; pass a video file"
        )
    try:
        return check_video(path) if num_frames is None else read_frames(path, num_frames)
    except VideoError as err:
        raise UserError(
            f"cannot read {path} as a video ({err}); pass an MP4, WebM or other video file"
        ) from None


def _output_path(output: Path | None, image_path: Path) -> Path:
    output = Path(output) if output is not None else Path(f"{Path(image_path).stem}_pmod.png")
    supported = Figure().canvas.get_supported_filetypes()
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in supported:
        raise UserError(
            f"--output {output}: cannot write a {suffix or 'suffix-less'} file; use a .png (or .pdf, .svg) name"
        )
    return output


def drawable_method(spec: str | None) -> TokenMethod | None:
    """The ``--method`` to route with (None: the checkpoint's own routing), refused in one line
    when its vision tokens are no longer one per patch (it pools, merges or resizes them)."""
    if spec is None:
        return None
    method = parse_method(spec)
    reshapes = type(method).prepare_images is not TokenMethod.prepare_images
    if method.prompt_tokens_per_image() is not None or reshapes:
        raise UserError(
            f"pmod visualize draws each kept vision token on its patch, but {method.name} changes the "
            "vision tokens before the language model (no token is one patch); choose a method that "
            "selects tokens inside it"
        )
    return method


def visualize_routing(
    image_paths: Path | Sequence[Path] = (),
    *,
    checkpoint: Path | None = None,
    method: str | None = None,
    layers: str | Sequence[int] | None = None,
    prompt: str | None = None,
    output: Path | None = None,
    matrix: bool = False,
    heatmap: bool = False,
    device: str | None = None,
    video: Path | None = None,
    frames: int | None = None,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
) -> VisualizeResult:
    """Route the images (one or several) and/or ``video`` through the checkpoint and write the
    figure; layers like ``"2,14,26"``; ``frames`` sampled from the video (default: as the
    checkpoint was trained, else 8); ``method`` a ``--method`` spec the checkpoint runs instead of
    its own routing (``fastv:layer=2``). The model also answers the prompt (``answer_tokens`` at
    most; 0: no answer) in the same run."""
    image_paths = [image_paths] if isinstance(image_paths, str | Path) else list(image_paths)
    if not image_paths and video is None:
        raise UserError("give an image (or several) and/or --video VIDEO")
    if frames is not None and frames < 1:
        raise UserError(f"--frames must be at least 1, got {frames}")
    method = drawable_method(method)
    images = [read_image(path) for path in image_paths]
    if video is not None:
        load_video(video)  # before the model loads: a bad file fails at once
    output = _output_path(output, image_paths[0] if image_paths else video)
    checkpoint, num_layers = _checkpoint_layers(checkpoint)
    chosen = parse_layers(layers, num_layers)
    family = family_for_model_type(read_model_type(checkpoint))
    if video is not None and not family.takes_video:
        raise UserError(f"{checkpoint} holds a {family.title} model, which takes no video")
    model, processor = load_checkpoint(
        checkpoint, device=resolve_device(device), dtype="auto", require_pmod=True
    )
    if method is not None:
        apply_method(model, method)
    clip = None
    if video is not None:
        clip = load_video(
            video,
            frames or getattr(processor.video_processor, "num_frames", None) or DEFAULT_FRAMES,
        )
    default_prompt = DEFAULT_VIDEO_PROMPT if video is not None and not images else DEFAULT_PROMPT
    selection = select_tokens(
        model, processor, images, prompt or default_prompt, answer_tokens, video=clip
    )
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
