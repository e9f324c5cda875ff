"""``pmod flops``: inference TFLOPs and KV cache of p-MoD (and other methods) against the dense
model; the flags fill one ``FlopsRequest`` for ``efficiency.plan.make_plan``."""

import json
from pathlib import Path
from typing import Annotated

import typer

from .options import (
    DEVICE_HELP,
    Betas,
    Count,
    Json,
    MaxRatio,
    Methods,
    MinRatio,
    Schedule,
    device_option,
    dtype_option,
    match_tflops_option,
)

# flags of pmod flops alone
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="PRESET",
        help="Shape preset (default llava-next-7b; also llava-onevision-qwen2-7b, ...); see "
        "docs/flops.md.",
    ),
]
Config = Annotated[
    str | None,
    typer.Option(
        "--config", metavar="PATH", help="HF config.json or checkpoint dir, dense or p-MoD."
    ),
]
VisionTokens = Annotated[
    int | None,
    typer.Option(
        "--vision-tokens",
        metavar="V",
        help="Vision tokens (default: the largest image layout).",
    ),
]
TextTokens = Annotated[
    int | None,
    typer.Option("--text-tokens", metavar="T", help="Text tokens (default 58, as in the paper)."),
]
VideoFrames = Annotated[
    int | None,
    typer.Option(
        "--video-frames",
        metavar="N",
        help="Count a video of N frames instead of an image (LLaVA-OneVision: 196 tokens a "
        "frame; Qwen-VL: per 2 frames).",
    ),
]
KvDtype = Annotated[str, dtype_option("KV cache dtype, also fp8", "the checkpoint's, else bf16")]
RoutedTokens = Annotated[
    str | None,
    typer.Option(
        "--routed-tokens",
        metavar="KIND",
        help="vision (p-MoD) or all (gamma-MoD: prompt text before the image competes too).",
    ),
]
PrefixTextTokens = Annotated[
    int | None,
    typer.Option(
        "--prefix-text-tokens",
        metavar="P",
        help="With routed tokens all: text tokens up to the image that compete (default 35).",
    ),
]
Calibration = Annotated[
    str | None,
    typer.Option(
        "--calibration",
        metavar="FILE",
        help="LLaVA JSON/JSONL samples (or tiny:...): run --config CHECKPOINT on them and "
        "count the measured ratios.",
    ),
]
CalibrationSamples = Annotated[
    int | None,
    typer.Option("--calibration-samples", metavar="N", help="Samples to measure (default 16)."),
]
ImageFolder = Annotated[
    str | None,
    typer.Option(
        "--image-folder",
        metavar="DIR",
        help="With --calibration: the directory its image paths are relative to (default: "
        "its own).",
    ),
]
MatchTflops = Annotated[bool, match_tflops_option("the (first) p-MoD setting's TFLOPs")]
CalibrationDevice = Annotated[
    str | None, device_option("With --calibration: where the model runs; " + DEVICE_HELP)
]
Plot = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        "--plot",
        metavar="FILE",
        help="Draw retention ratio vs layer into this image file (PNG, PDF, SVG).",
    ),
]


def flops(
    model: Model = None,
    config: Config = None,
    beta: Betas = None,
    schedule: Schedule = None,
    min_ratio: MinRatio = None,
    max_ratio: MaxRatio = None,
    vision_tokens: VisionTokens = None,
    text_tokens: TextTokens = None,
    video_frames: VideoFrames = None,
    count: Count = "paper",
    dtype: KvDtype = "bf16",
    routed_tokens: RoutedTokens = None,
    prefix_text_tokens: PrefixTextTokens = None,
    calibration: Calibration = None,
    calibration_samples: CalibrationSamples = None,
    image_folder: ImageFolder = None,
    method: Methods = None,
    match_tflops: MatchTflops = False,
    device: CalibrationDevice = None,
    as_json: Json = False,
    plot: Plot = None,
) -> None:
    """Count inference TFLOPs and KV cache of p-MoD (and training-free baselines) against the dense model."""
    from ..efficiency.plan import FlopsRequest, make_plan, plan_to_json

    request = FlopsRequest(
        model=model,
        config=config,
        betas=tuple(beta or ()),
        schedule=schedule,
        min_ratio=min_ratio,
        max_ratio=max_ratio,
        vision_tokens=vision_tokens,
        text_tokens=text_tokens,
        video_frames=video_frames,
        count=count,
        dtype=dtype,
        routed_tokens=routed_tokens,
        prefix_text_tokens=prefix_text_tokens,
        calibration=calibration,
        calibration_samples=calibration_samples,
        image_folder=image_folder,
        device=device,
        methods=tuple(method or ()),
        match_tflops=match_tflops,
    )
    plan = make_plan(request)
    if plot is not None:
        from ..efficiency.plot import plot_retention_ratios

        plot_retention_ratios(plan, plot)
    if as_json:
        typer.echo(json.dumps({**plan_to_json(plan), "plot": str(plot) if plot else None}))
        return
    from ..efficiency.report import print_plan

    print_plan(plan)
    if plot is not None:
        typer.echo(f"plot written to {plot}")
