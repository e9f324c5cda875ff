"""``pmod convert``: a checkpoint of a registered family into a p-MoD one (or a llava-hf one)."""

from pathlib import Path
from typing import Annotated

import typer

from .options import Beta, MaxRatio, MinRatio, Schedule

# flags of pmod convert alone
Source = Annotated[
    Path,
    typer.Argument(
        metavar="SOURCE",
        help="A llava-hf (LLaVA, LLaVA-NeXT, LLaVA-OneVision) or Qwen-VL, original LLaVA or "
        "official p-MoD checkpoint directory, or a LoRA adapter directory (format detected).",
    ),
]
Output = Annotated[
    Path,
    typer.Argument(
        metavar="OUTPUT", help="Where to write the HF-native checkpoint (a new directory)."
    ),
]
Dense = Annotated[
    bool,
    typer.Option(
        "--dense",
        help="Write a plain llava-hf checkpoint (original LLaVA / official p-MoD sources).",
    ),
]
VisionTower = Annotated[
    Path | None,
    typer.Option(
        "--vision-tower",
        metavar="DIR",
        help="The vision tower's local directory, when the config names a hub id.",
    ),
]


def convert(
    source: Source,
    output: Output,
    beta: Beta = None,
    schedule: Schedule = None,
    min_ratio: MinRatio = None,
    max_ratio: MaxRatio = None,
    dense: Dense = False,
    vision_tower: VisionTower = None,
) -> None:
    """Convert a checkpoint into a p-MoD one (or, with --dense, a llava-hf one); official p-MoD keeps its routers."""
    from ..model.loading import checkpoint_summary, convert_checkpoint, pmod_overrides

    overrides = pmod_overrides(
        beta=beta, schedule=schedule, min_ratio=min_ratio, max_ratio=max_ratio
    )
    written = convert_checkpoint(
        source, output, overrides=overrides, dense=dense, vision_tower=vision_tower
    )
    typer.echo(f"wrote {written}: {checkpoint_summary(written)}")
