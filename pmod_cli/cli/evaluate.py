"""``pmod eval`` (lmms-eval benchmarks with measured efficiency) and ``pmod chat`` (one
checkpoint, asked in turns)."""

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .options import (
    Count,
    Device,
    Json,
    MaxNewTokens,
    dtype_option,
    match_tflops_option,
    method_option,
    output_option,
)

# flags of pmod eval alone
Checkpoints = Annotated[
    list[Path],
    typer.Argument(
        metavar="CHECKPOINT",
        help="p-MoD or plain LLaVA / LLaVA-NeXT / OneVision / Qwen-VL checkpoint directories.",
    ),
]
Tasks = Annotated[
    str,
    typer.Option(
        "--tasks",
        metavar="TASK,TASK",
        help="Comma-separated lmms-eval tasks, e.g. pmod_tiny_vqa, pmod_tiny_video or "
        "pmod_paper14.",
    ),
]
Limit = Annotated[
    int | None,
    typer.Option("--limit", metavar="N", help="Evaluate only the first N samples of each task."),
]
BatchSize = Annotated[
    int,
    typer.Option("--batch-size", metavar="N", help="Samples generated together (left padding)."),
]
IncludePath = Annotated[
    Path | None,
    typer.Option(
        "--include-path", metavar="DIR", help="A directory of extra lmms-eval task YAMLs."
    ),
]
Output = Annotated[
    Path | None,
    output_option(
        "Also write the report (and every measurement) to this JSON file; lmms-eval's own "
        "files go to FILE_lmms_eval/."
    ),
]
EvalDtype = Annotated[str, dtype_option("Precision the checkpoints run in")]
EvalMethods = Annotated[list[str] | None, method_option("Run each checkpoint with each of them. ")]
EvalMatchTflops = Annotated[
    bool, match_tflops_option("the checkpoint's p-MoD plan on the requests")
]


def evaluate(
    checkpoints: Checkpoints,
    tasks: Tasks,
    limit: Limit = None,
    batch_size: BatchSize = 1,
    include_path: IncludePath = None,
    output: Output = None,
    device: Device = None,
    dtype: EvalDtype = "auto",
    count: Count = "paper",
    method: EvalMethods = None,
    match_tflops: EvalMatchTflops = False,
    as_json: Json = False,
) -> None:
    """Evaluate checkpoints with lmms-eval: accuracy and measured efficiency side by side."""
    from ..evaluation.run import (
        check_output_path,
        evaluate_checkpoints,
        lmms_eval_dir_for,
        report_to_json,
        write_json_atomically,
    )
    from ..model.methods import parse_methods

    if output is not None:
        check_output_path(output)  # before hours of evaluation, not after
    methods = parse_methods(method, match_tflops) if method else None
    if methods is None and match_tflops:
        raise UserError("--match-tflops solves a method's knob: add --method fastv or pool")
    task_list = [task.strip() for task in tasks.split(",") if task.strip()]
    report = evaluate_checkpoints(
        checkpoints,
        task_list,
        limit=limit,
        batch_size=batch_size,
        include_path=include_path,
        device=device,
        dtype=dtype,
        count=count,
        lmms_eval_dir=lmms_eval_dir_for(output) if output is not None else None,
        methods=methods,
        match_tflops=match_tflops,
    )
    if report is None:  # another process of a torchrun / accelerate launch: process 0 reports
        return
    report_json = report_to_json(report)
    if as_json:
        typer.echo(json.dumps(report_json))
    else:
        from rich.console import Console

        from ..evaluation.report import report_table

        Console().print(report_table(report))
    if output is not None:
        write_json_atomically(report_json, output)
        typer.echo(f"report written to {output}", err=as_json)


# flags of pmod chat alone
Checkpoint = Annotated[
    Path, typer.Argument(metavar="CHECKPOINT", help="A checkpoint directory, p-MoD or dense.")
]
Question = Annotated[
    str | None,
    typer.Argument(
        metavar="QUESTION",
        help="Ask this and exit; without it, ask in turns until an empty line or EOF.",
    ),
]
Image = Annotated[
    list[Path] | None,
    typer.Option("--image", metavar="IMAGE", help="An image to ask about (repeatable)."),
]
ChatDtype = Annotated[str, dtype_option("Precision the checkpoint runs in")]


def chat(
    checkpoint: Checkpoint,
    question: Question = None,
    image: Image = None,
    max_new_tokens: MaxNewTokens = 256,
    device: Device = None,
    dtype: ChatDtype = "auto",
) -> None:
    """Ask a checkpoint about images: the answer streamed, then one line of what it cost against the dense twin."""
    from ..evaluation.chat import run_chat

    run_chat(
        checkpoint, image or [], question, max_new_tokens=max_new_tokens, device=device, dtype=dtype
    )
