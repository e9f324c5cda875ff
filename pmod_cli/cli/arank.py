"""``pmod arank``: gamma-MoD's ARank, the rank of each layer's attention maps."""

from pathlib import Path
from typing import Annotated

import typer

from .options import Device, Json, dtype_option, output_option

# flags of pmod arank alone
Checkpoint = Annotated[
    str,
    typer.Argument(
        metavar="CHECKPOINT",
        help="A LLaVA / LLaVA-NeXT / OneVision / Qwen-VL checkpoint directory, plain HF or "
        "p-MoD (or tiny:base).",
    ),
]
Data = Annotated[
    str,
    typer.Option(
        "--data",
        metavar="FILE",
        help="LLaVA-format JSON / JSONL image-question samples (or tiny:shapes/heldout.json).",
    ),
]
ImageFolder = Annotated[
    str | None,
    typer.Option(
        "--image-folder",
        metavar="DIR",
        help="Directory the samples' image paths are relative to (default: the data file's; "
        "tiny:shapes/images for tiny:shapes data).",
    ),
]
Samples = Annotated[
    int,
    typer.Option("--samples", metavar="N", help="How many image-question samples to average over."),
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", metavar="N", help="Samples per forward pass.")
]
DenseLayers = Annotated[
    int,
    typer.Option(
        "--dense-layers",
        metavar="K",
        help="K: the K highest-ARank layers stay dense, the rest become MoD.",
    ),
]
Output = Annotated[Path, output_option("Where to draw ARank per layer (PNG, PDF, SVG).")]
Dtype = Annotated[str, dtype_option("Precision of the model and its attention maps")]
Save = Annotated[
    Path | None,
    typer.Option(
        "--save",
        metavar="FILE",
        help="Write the ARank result file (JSON) that recipes and PMoDConfig can use.",
    ),
]


def arank(
    checkpoint: Checkpoint,
    data: Data,
    image_folder: ImageFolder = None,
    samples: Samples = 16,
    batch_size: BatchSize = 4,
    dense_layers: DenseLayers = 4,
    output: Output = Path("arank.png"),
    dtype: Dtype = "fp32",
    device: Device = None,
    as_json: Json = False,
    save: Save = None,
) -> None:
    """gamma-MoD's ARank: rank of each layer's attention maps, and the MoD layers it proposes."""
    from ..analysis.arank import measure_arank
    from ..analysis.report import check_plot_path, report_arank

    check_plot_path(output)
    result = measure_arank(
        checkpoint,
        data,
        image_folder=image_folder,
        samples=samples,
        batch_size=batch_size,
        dense_layers=dense_layers,
        dtype=dtype,
        device=device,
    )
    report_arank(result, output, save=save, as_json=as_json)
