"""``pmod data``: the paper's training data turned into what ``pmod sft`` reads."""

import json
from pathlib import Path
from typing import Annotated

import typer

from .options import Json

data_app = typer.Typer(
    help="The paper's training data: turn it into what `pmod sft` reads.", no_args_is_help=True
)


# flags of pmod data prepare alone
Source = Annotated[
    Path | None,
    typer.Argument(
        metavar="SOURCE",
        help="LLaVA-NeXT-Data parquet shards (a directory or one file), or a LLaVA JSON such "
        "as llava_v1_5_mix665k.json.",
    ),
]
Output = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        metavar="DIR",
        help="Output directory: data.json, images/, dropped.jsonl, prepare.json.",
    ),
]
FromHub = Annotated[
    str | None,
    typer.Option(
        "--from-hub",
        metavar="DATASET",
        help="Instead of SOURCE: stream a hub dataset in the LLaVA-NeXT-Data layout, e.g. "
        "lmms-lab/LLaVA-NeXT-Data.",
    ),
]
Split = Annotated[
    str, typer.Option("--split", metavar="SPLIT", help="With --from-hub: the split to read.")
]
ImageFolder = Annotated[
    Path | None,
    typer.Option(
        "--image-folder",
        metavar="DIR",
        help="With a LLaVA JSON: the directory its image paths are relative to (default: the "
        "JSON's).",
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        metavar="N",
        help="Threads checking and writing images (default: the CPUs, at most 8).",
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace what --output holds from another source."),
]


@data_app.command("prepare")
def data_prepare(
    source: Source = None,
    output: Output = ...,  # required, though after SOURCE, which is not
    from_hub: FromHub = None,
    split: Split = "train",
    image_folder: ImageFolder = None,
    workers: Workers = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Clean a LLaVA JSON, or write the LLaVA-NeXT parquet shards out as images + one LLaVA JSON (resumable)."""
    from ..data.prepare import prepare_data, print_report, result_to_json

    result = prepare_data(
        source,
        output,
        from_hub=from_hub,
        split=split,
        image_folder=image_folder,
        workers=workers,
        overwrite=overwrite,
    )
    if as_json:
        typer.echo(json.dumps(result_to_json(result)))
    else:
        print_report(result)
