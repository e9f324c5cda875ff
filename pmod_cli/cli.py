"""The ``pmod`` command line: parses arguments and calls into the package, nothing more.

Start-up stays light: ``pmod --help``, ``--version``, shell completion and argument errors need
only typer and this module; each command imports what it uses inside its function.
Conventions for a command's flags: ``--output/-o FILE`` for its one output file, ``--json``
for one JSON object on stdout, ``--device`` where a model runs and ``--dtype`` where a
precision is taken (both read by ``pmod_cli.runtime``), an upper-case metavar for every value.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import typer

from .errors import UserError
from .process_exit import exit_process

# Typer tags each argument with its Python type (`CHECKPOINT <list[Path]>`); the metavar every
# argument here has says what to give, as it does for options
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None

app = typer.Typer(
    name="pmod",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help text: no panels, and rich is not imported to print it
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


# ---- flags shared by several commands ----------------------------------------------------

DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)."


def _output_option(help: str, default: Path | None = None):
    return typer.Option(default, "--output", "-o", metavar="FILE", help=help)


def _json_option():
    return typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")


def _device_option(help: str = DEVICE_HELP):
    return typer.Option(None, "--device", metavar="DEVICE", help=help)


def _dtype_option(default: str, what: str, auto: str = "the checkpoint's own"):
    spellings = "bf16 (bfloat16), fp16 (float16), fp32 (float32)"
    return typer.Option(
        default, "--dtype", metavar="DTYPE", help=f"{what}: {spellings} or auto ({auto})."
    )


# the training-free baselines' flags (pmod flops, pmod eval)
_METHOD_HELP = "pmod, dense, fastv, random, pool (comma-separated or repeated): training-free baselines next to p-MoD."


def _method_option(help: str = _METHOD_HELP):
    return typer.Option(None, "--method", metavar="METHOD,METHOD", help=help)


def _fastv_layer_option():
    help = "FastV's K: layers 0..K-1 see every token, the rest the top-ranked ones (default 2)."
    return typer.Option(None, "--fastv-layer", metavar="K", help=help)


def _fastv_ratio_option():
    help = (
        "FastV's R, the FRACTION OF VISION TOKENS DROPPED after layer K, in (0, 1] (default 0.5)."
    )
    return typer.Option(None, "--fastv-ratio", metavar="R", help=help)


def _fastv_score_option():
    help = "FastV's ranking: last (the last prompt token's attention, its code) or mean (all prompt tokens)."
    return typer.Option(None, "--fastv-score", metavar="SCORE", help=help)


def _pool_tokens_option():
    help = "pool: vision tokens per image after average pooling over the patch grid (at most V)."
    return typer.Option(None, "--pool-tokens", metavar="N", help=help)


def _seed_option():
    return typer.Option(
        None, "--seed", metavar="S", help="random: the seed of the draw (default 0)."
    )


def _split_methods(values: list[str] | None) -> list[str]:
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def _print_version(value: bool) -> None:
    if not value:
        return
    from .provenance import package_versions
    from .runtime import sentencepiece_problem

    versions = package_versions()
    others = [
        f"{name.replace('_', '-')} {v}" for name, v in versions.items() if name != "pmod" and v
    ]
    typer.echo(f"pmod {versions['pmod']} ({', '.join(others)})")
    if problem := sentencepiece_problem():
        typer.echo(f"warning: {problem}", err=True)
    raise typer.Exit()


@app.callback()
def pmod(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_print_version,
        help="Print the versions of pmod, torch, transformers and lmms-eval, and exit.",
    ),
) -> None:
    """p-MoD for LLaVA-family models: convert, train, evaluate, count FLOPs, visualise."""


# ---- commands ----------------------------------------------------------------------------


@app.command()
def flops(
    model: str = typer.Option(
        None,
        "--model",
        metavar="PRESET",
        help="Shape preset (default llava-next-7b; also llava-onevision-qwen2-7b, ...); see docs/flops.md.",
    ),
    config: str = typer.Option(
        None, "--config", metavar="PATH", help="HF config.json or checkpoint dir, dense or p-MoD."
    ),
    beta: list[float] = typer.Option(
        None, "--beta", metavar="BETA", help="PRD shift (default 0.5); repeat to compare."
    ),
    schedule: str = typer.Option(
        None,
        "--schedule",
        metavar="NAME",
        help="cosine (PRD), linear, stepped, constant, interleaved.",
    ),
    min_ratio: float = typer.Option(
        None, "--min-ratio", metavar="R", help="Lowest ratio of a MoD layer (default 0.15)."
    ),
    max_ratio: float = typer.Option(
        None, "--max-ratio", metavar="R", help="Above it a layer stays dense (default 0.85)."
    ),
    vision_tokens: int = typer.Option(
        None,
        "--vision-tokens",
        metavar="V",
        help="Vision tokens (default: the largest image layout).",
    ),
    text_tokens: int = typer.Option(
        None, "--text-tokens", metavar="T", help="Text tokens (default 58, as in the paper)."
    ),
    video_frames: int = typer.Option(
        None,
        "--video-frames",
        metavar="N",
        help="Count a video of N frames instead of an image (LLaVA-OneVision: 196 tokens a frame; Qwen-VL: per 2 frames).",
    ),
    count: str = typer.Option(
        "paper",
        "--count",
        metavar="MODE",
        help="paper (the paper's profiler) or full (+ attention, vision tower, projector).",
    ),
    dtype: str = _dtype_option("bf16", "KV cache dtype, also fp8", "the checkpoint's, else bf16"),
    routed_tokens: str = typer.Option(
        None,
        "--routed-tokens",
        metavar="KIND",
        help="vision (p-MoD) or all (gamma-MoD: prompt text before the image competes too).",
    ),
    prefix_text_tokens: int = typer.Option(
        None,
        "--prefix-text-tokens",
        metavar="P",
        help="With routed tokens all: text tokens up to the image that compete (default 35).",
    ),
    calibration: str = typer.Option(
        None,
        "--calibration",
        metavar="FILE",
        help="LLaVA JSON/JSONL samples (or tiny:...): run --config CHECKPOINT on them and count "
        "the measured ratios.",
    ),
    calibration_samples: int = typer.Option(
        None, "--calibration-samples", metavar="N", help="Samples to measure (default 16)."
    ),
    image_folder: str = typer.Option(
        None,
        "--image-folder",
        metavar="DIR",
        help="With --calibration: the directory its image paths are relative to (default: its own).",
    ),
    method: list[str] = _method_option(),
    fastv_layer: int = _fastv_layer_option(),
    fastv_ratio: float = _fastv_ratio_option(),
    fastv_score: str = _fastv_score_option(),
    pool_tokens: int = _pool_tokens_option(),
    seed: int = _seed_option(),
    match_tflops: bool = typer.Option(
        False,
        "--match-tflops",
        help="Solve FastV's R and pool's N to match the (first) p-MoD setting's TFLOPs.",
    ),
    device: str = _device_option("With --calibration: where the model runs; " + DEVICE_HELP),
    as_json: bool = _json_option(),
    plot: Path = typer.Option(
        None,
        "--output",
        "-o",
        "--plot",
        metavar="FILE",
        help="Draw retention ratio vs layer into this image file (PNG, PDF, SVG).",
    ),
) -> None:
    """Count inference TFLOPs and KV cache of p-MoD (and training-free baselines) against the dense model."""
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
        routed_tokens=routed_tokens,
        prefix_text_tokens=prefix_text_tokens,
        calibration=calibration,
        calibration_samples=calibration_samples,
        image_folder=image_folder,
        video_frames=video_frames,
        methods=_split_methods(method),
        fastv_layer=fastv_layer,
        fastv_ratio=fastv_ratio,
        fastv_score=fastv_score,
        pool_tokens=pool_tokens,
        seed=seed,
        match_tflops=match_tflops,
        device=device,
    )
    if plot is not None:
        from .efficiency.plot import plot_retention_ratios

        plot_retention_ratios(plan, plot)
    if as_json:
        typer.echo(json.dumps({**plan_to_json(plan), "plot": str(plot) if plot else None}))
        return
    from .efficiency.report import print_plan

    print_plan(plan)
    if plot is not None:
        typer.echo(f"plot written to {plot}")


@app.command()
def visualize(
    images: list[Path] = typer.Argument(
        None,
        metavar="[IMAGE]...",
        help="The image(s) to route (PNG, JPEG, ...); several go side by side.",
    ),
    video: Path = typer.Option(
        None,
        "--video",
        metavar="FILE",
        help="A video to route (LLaVA-OneVision, Qwen-VL): a frames x layers grid.",
    ),
    frames: int = typer.Option(
        None,
        "--frames",
        metavar="N",
        help="Frames sampled from --video (default: as the checkpoint trained, else 8).",
    ),
    checkpoint: Path = typer.Option(
        None,
        "--checkpoint",
        metavar="DIR",
        help="p-MoD checkpoint directory (default: the tiny default's runs/tiny/sft).",
    ),
    layers: str = typer.Option(
        None,
        "--layers",
        metavar="L,L,...",
        help="Decoder layers to draw, e.g. 2,14,26 (default: 4 MoD layers, first to last).",
    ),
    prompt: str = typer.Option(
        None,
        "--prompt",
        metavar="TEXT",
        help="The question asked with the image (default: Describe the image.).",
    ),
    output: Path = _output_option("Figure file (default: <image or video stem>_pmod.png)."),
    matrix: bool = typer.Option(
        False, "--matrix", help="Add the layers x vision-token matrix (the paper's Figure 6)."
    ),
    heatmap: bool = typer.Option(
        False, "--heatmap", help="Colour patches by router weight instead of kept/skipped."
    ),
    device: str = _device_option(),
    as_json: bool = _json_option(),
) -> None:
    """Show which image patches (and video frames' patches) each p-MoD layer keeps: a figure and a
    table of kept counts."""
    if not images and video is None:  # checked before the ML stack loads, as Typer's own are
        raise UserError(
            "missing argument 'IMAGE': give one or more images, or --video FILE "
            "(see 'pmod visualize --help')"
        )
    from .visualization.visualize import kept_table, kept_to_json, visualize_routing

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
    )
    if as_json:
        import json

        typer.echo(json.dumps(kept_to_json(result)))
        return
    from rich.console import Console

    Console().print(kept_table(result.selection, result.layers))
    if result.selection.answer is not None:
        typer.echo(f"answer: {result.selection.answer}")
    typer.echo(f"figure written to {result.output}")


@app.command()
def demo(
    checkpoint: Path = typer.Argument(
        None,
        metavar="CHECKPOINT",
        help="p-MoD checkpoint directory (default: the tiny default's runs/tiny/sft).",
    ),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        metavar="ADDRESS",
        help="Address to listen on (0.0.0.0: every interface).",
    ),
    port: int = typer.Option(7860, "--port", metavar="PORT", help="TCP port to listen on."),
    method: list[str] = typer.Option(
        None,
        "--method",
        metavar="METHOD",
        help="Ways to run a request offered side by side: pmod, dense, fastv, random "
        "(default: pmod,dense).",
    ),
    max_new_tokens: int = typer.Option(
        256, "--max-new-tokens", metavar="N", help="Longest answer, in tokens."
    ),
    device: str = _device_option(),
) -> None:
    """A local web page: ask about an image, watch the answer stream, the patches each layer kept and the costs."""
    from .demo.server import serve_until_interrupted, start_demo

    server = start_demo(
        checkpoint,
        host=host,
        port=port,
        methods=method,
        device=device,
        max_new_tokens=max_new_tokens,
    )
    serve_until_interrupted(
        server, on_ready=lambda: typer.echo(f"pmod demo: serving {server.url} (Ctrl-C stops it)")
    )


@app.command()
def convert(
    source: Path = typer.Argument(
        ...,
        metavar="SOURCE",
        help="A llava-hf (LLaVA, LLaVA-NeXT, LLaVA-OneVision) or Qwen-VL, original LLaVA or official p-MoD "
        "checkpoint directory, or a LoRA adapter directory (format detected).",
    ),
    output: Path = typer.Argument(
        ..., metavar="OUTPUT", help="Where to write the HF-native checkpoint (a new directory)."
    ),
    beta: float = typer.Option(
        None,
        "--beta",
        metavar="BETA",
        help="PRD shift (default 0.5): 0.5 keeps layers 0-7 dense at 32 layers.",
    ),
    schedule: str = typer.Option(
        None,
        "--schedule",
        metavar="NAME",
        help="cosine (PRD), linear, stepped, constant, interleaved, cosine31, ... (see docs/model.md).",
    ),
    min_ratio: float = typer.Option(
        None,
        "--min-ratio",
        metavar="R",
        help="Lowest retention ratio of a MoD layer (default 0.15).",
    ),
    max_ratio: float = typer.Option(
        None, "--max-ratio", metavar="R", help="Above it a layer stays dense (default 0.85)."
    ),
    dense: bool = typer.Option(
        False,
        "--dense",
        help="Write a plain llava-hf checkpoint (original LLaVA / official p-MoD sources).",
    ),
    vision_tower: Path = typer.Option(
        None,
        "--vision-tower",
        metavar="DIR",
        help="The vision tower's local directory, when the config names a hub id.",
    ),
) -> None:
    """Convert a checkpoint into a p-MoD one (or, with --dense, a llava-hf one); official p-MoD keeps its routers."""
    from .model.loading import checkpoint_summary, convert_checkpoint, pmod_overrides

    overrides = pmod_overrides(
        beta=beta, schedule=schedule, min_ratio=min_ratio, max_ratio=max_ratio
    )
    written = convert_checkpoint(
        source, output, overrides=overrides, dense=dense, vision_tower=vision_tower
    )
    typer.echo(f"wrote {written}: {checkpoint_summary(written)}")


_RECIPE_HELP = "Recipe TOML with the sections model, pmod, data, train and (optional) lora (see docs/recipes.md)."
_SET_HELP = "Override a recipe key (repeatable), e.g. --set train.max_steps=20."
_RESUME_HELP = "Continue exactly from the last checkpoint-N in train.output_dir."
_DRY_RUN_HELP = "Check the recipe and every data sample, print the plan (parts, schedule, TFLOPs); train nothing."


@app.command()
def pretrain(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help=_RECIPE_HELP),
    overrides: list[str] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE", help=_SET_HELP),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Stage 1: train the connector on captions (e.g. recipes/tiny_pretrain.toml)."""
    from .training.stages import launch

    launch("pretrain", recipe, overrides or [], resume=resume, dry_run=dry_run)


@app.command()
def sft(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help=_RECIPE_HELP),
    overrides: list[str] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE", help=_SET_HELP),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Stage 2: p-MoD instruction tuning of connector + LLM + routers (e.g. recipes/tiny.toml)."""
    from .training.stages import launch

    launch("sft", recipe, overrides or [], resume=resume, dry_run=dry_run)


@app.command()
def arank(
    checkpoint: str = typer.Argument(
        ...,
        metavar="CHECKPOINT",
        help="A LLaVA / LLaVA-NeXT / OneVision / Qwen-VL checkpoint directory, plain HF or p-MoD (or tiny:base).",
    ),
    data: str = typer.Option(
        ...,
        "--data",
        metavar="FILE",
        help="LLaVA-format JSON / JSONL image-question samples (or tiny:shapes/heldout.json).",
    ),
    image_folder: str = typer.Option(
        None,
        "--image-folder",
        metavar="DIR",
        help="Directory the samples' image paths are relative to (default: the data file's; "
        "tiny:shapes/images for tiny:shapes data).",
    ),
    samples: int = typer.Option(
        16, "--samples", metavar="N", help="How many image-question samples to average over."
    ),
    batch_size: int = typer.Option(
        4, "--batch-size", metavar="N", help="Samples per forward pass."
    ),
    dense_layers: int = typer.Option(
        4,
        "--dense-layers",
        metavar="K",
        help="K: the K highest-ARank layers stay dense, the rest become MoD.",
    ),
    output: Path = _output_option(
        "Where to draw ARank per layer (PNG, PDF, SVG).", Path("arank.png")
    ),
    dtype: str = _dtype_option("fp32", "Precision of the model and its attention maps"),
    device: str = _device_option(),
    as_json: bool = _json_option(),
    save: Path = typer.Option(
        None,
        "--save",
        metavar="FILE",
        help="Write the ARank result file (JSON) that recipes and PMoDConfig can use.",
    ),
) -> None:
    """gamma-MoD's ARank: rank of each layer's attention maps, and the MoD layers it proposes."""
    from .analysis.arank import measure_arank
    from .analysis.report import check_plot_path, report_arank

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


@app.command("eval")
def evaluate(
    checkpoints: list[Path] = typer.Argument(
        ...,
        metavar="CHECKPOINT",
        help="p-MoD or plain LLaVA / LLaVA-NeXT / OneVision / Qwen-VL checkpoint directories.",
    ),
    tasks: str = typer.Option(
        ...,
        "--tasks",
        metavar="TASK,TASK",
        help="Comma-separated lmms-eval tasks, e.g. pmod_tiny_vqa, pmod_tiny_video or pmod_paper14.",
    ),
    limit: int = typer.Option(
        None, "--limit", metavar="N", help="Evaluate only the first N samples of each task."
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", metavar="N", help="Samples generated together (left padding)."
    ),
    include_path: Path = typer.Option(
        None, "--include-path", metavar="DIR", help="A directory of extra lmms-eval task YAMLs."
    ),
    output: Path = _output_option(
        "Also write the report (and every measurement) to this JSON file; lmms-eval's own files "
        "go to FILE_lmms_eval/."
    ),
    device: str = _device_option(),
    dtype: str = _dtype_option("auto", "Precision the checkpoints run in"),
    count: str = typer.Option(
        "paper", "--count", metavar="MODE", help="TFLOPs count: paper (as `pmod flops`) or full."
    ),
    method: list[str] = _method_option("Run each checkpoint with each of: " + _METHOD_HELP),
    fastv_layer: int = _fastv_layer_option(),
    fastv_ratio: float = _fastv_ratio_option(),
    fastv_score: str = _fastv_score_option(),
    pool_tokens: int = _pool_tokens_option(),
    seed: int = _seed_option(),
    match_tflops: bool = typer.Option(
        False,
        "--match-tflops",
        help="Solve FastV's R and pool's N on the requests to cost what the checkpoint's p-MoD plan costs.",
    ),
    as_json: bool = _json_option(),
) -> None:
    """Evaluate checkpoints with lmms-eval: accuracy and measured efficiency side by side."""
    from .evaluation.run import (
        check_output_path,
        evaluate_checkpoints,
        lmms_eval_dir_for,
        report_to_json,
        write_json_atomically,
    )
    from .model.methods import methods_from_flags

    if output is not None:
        check_output_path(output)  # before hours of evaluation, not after
    names = _split_methods(method)
    methods = (
        methods_from_flags(
            names, fastv_layer, fastv_ratio, fastv_score, pool_tokens, seed, match_tflops
        )
        if names
        else None
    )
    if methods is None and match_tflops:
        raise UserError("--match-tflops solves a baseline's setting: add --method fastv or pool")
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
        import json

        typer.echo(json.dumps(report_json))
    else:
        from rich.console import Console

        from .evaluation.report import report_table

        Console().print(report_table(report))
    if output is not None:
        write_json_atomically(report_json, output)
        typer.echo(f"report written to {output}", err=as_json)


@app.command()
def chat(
    checkpoint: Path = typer.Argument(
        ..., metavar="CHECKPOINT", help="A checkpoint directory, p-MoD or dense."
    ),
    question: str = typer.Argument(
        None,
        metavar="QUESTION",
        help="Ask this and exit; without it, ask in turns until an empty line or EOF.",
    ),
    image: list[Path] = typer.Option(
        None, "--image", metavar="IMAGE", help="An image to ask about (repeatable)."
    ),
    max_new_tokens: int = typer.Option(
        256, "--max-new-tokens", metavar="N", help="Longest answer, in tokens."
    ),
    device: str = _device_option(),
    dtype: str = _dtype_option("auto", "Precision the checkpoint runs in"),
) -> None:
    """Ask a checkpoint about images: the answer streamed, then one line of what it cost against the dense twin."""
    from .evaluation.chat import run_chat

    run_chat(
        checkpoint, image or [], question, max_new_tokens=max_new_tokens, device=device, dtype=dtype
    )


data_app = typer.Typer(
    help="The paper's training data: turn it into what `pmod sft` reads.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    source: Path = typer.Argument(
        None,
        metavar="SOURCE",
        help="LLaVA-NeXT-Data parquet shards (a directory or one file), or a LLaVA JSON such as llava_v1_5_mix665k.json.",
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        metavar="DIR",
        help="Output directory: data.json, images/, dropped.jsonl, prepare.json.",
    ),
    from_hub: str = typer.Option(
        None,
        "--from-hub",
        metavar="DATASET",
        help="Instead of SOURCE: stream a hub dataset in the LLaVA-NeXT-Data layout, e.g. lmms-lab/LLaVA-NeXT-Data.",
    ),
    split: str = typer.Option(
        "train", "--split", metavar="SPLIT", help="With --from-hub: the split to read."
    ),
    image_folder: Path = typer.Option(
        None,
        "--image-folder",
        metavar="DIR",
        help="With a LLaVA JSON: the directory its image paths are relative to (default: the JSON's).",
    ),
    workers: int = typer.Option(
        None,
        "--workers",
        metavar="N",
        help="Threads checking and writing images (default: the CPUs, at most 8).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace what --output holds from another source."
    ),
    as_json: bool = _json_option(),
) -> None:
    """Clean a LLaVA JSON, or write the LLaVA-NeXT parquet shards out as images + one LLaVA JSON (resumable)."""
    from .data.prepare import prepare_data, print_report, result_to_json

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
        import json

        typer.echo(json.dumps(result_to_json(result)))
    else:
        print_report(result)


# ---- the entry point: one error style, stdout kept for results ---------------------------


def _paint(text: str, colour: str) -> str:
    """``text`` in ``colour`` when stderr is a terminal and NO_COLOR is not set (no-color.org)."""
    if os.environ.get("NO_COLOR") or not sys.stderr.isatty():
        return text
    return typer.style(text, fg=colour, bold=True)


def _error(message: str) -> int:
    typer.echo(f"{_paint('error:', 'red')} {message}", err=True)
    return 2


def _usage_error(err: typer.TyperException) -> int:
    """Typer's usage errors (bad value, missing argument, unknown option) as one ``error:`` line."""
    if type(err).__name__ == "NoArgsIsHelpError":  # a bare `pmod`: the help is the answer
        typer.echo(err.format_message())
        return 2
    message = " ".join(line.strip() for line in err.format_message().splitlines() if line.strip())
    message = message[:1].lower() + message[1:].rstrip(".")
    context = getattr(err, "ctx", None)
    command = context.command_path if context is not None else "pmod"
    return _error(f"{message} (see '{command} --help')")


class _WarningLines(logging.Handler):
    """A package warning as one ``warning: ...`` line on stderr (as errors are ``error: ...``)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"{_paint('warning:', 'yellow')} {record.getMessage()}", err=True)


class _StdoutToStderr(logging.Filter):
    """DeepSpeed logs through its own handler on stdout, where results (``--json``) go: point
    that handler at stderr before each record passes (it is created on ``import deepspeed``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for handler in logging.getLogger(record.name).handlers:
            if type(handler) is logging.StreamHandler and handler.stream is not sys.stderr:
                handler.setStream(sys.stderr)
        return True


@contextlib.contextmanager
def _command_logging():
    """For one command: pmod's warnings as lines, DeepSpeed's logs on stderr; code importing
    pmod_cli keeps its own logging set-up, so both are undone afterwards."""
    package_logger, deepspeed_logger = logging.getLogger("pmod_cli"), logging.getLogger("DeepSpeed")
    handler, propagate, stdout_guard = (
        _WarningLines(logging.WARNING),
        package_logger.propagate,
        _StdoutToStderr(),
    )
    package_logger.addHandler(handler)
    package_logger.propagate = False
    deepspeed_logger.addFilter(stdout_guard)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.propagate = propagate
        deepspeed_logger.removeFilter(stdout_guard)


def main() -> None:
    """The ``pmod`` command: user errors of any kind end in one ``error:`` line and exit code 2."""
    # reports record the command as it can be typed again (`pmod ...`, also under python -m);
    # the deepspeed launcher adds --local_rank=N, which LOCAL_RANK in the environment also says
    local_rank = ("--local_rank=", "--local-rank=")
    sys.argv = ["pmod", *(arg for arg in sys.argv[1:] if not arg.startswith(local_rank))]
    with _command_logging():
        try:
            code = app(prog_name="pmod", standalone_mode=False)
        except UserError as err:
            code = _error(str(err))
            code = getattr(err, "exit_code", code)  # a run stopped by a signal: 128 + its number
        except typer.TyperException as err:  # click's exceptions, which Typer vendors
            code = _usage_error(err)
        except typer.Abort:
            code = _error("aborted")
    # a process of a torchrun / deepspeed run must not meet gloo's threads in the interpreter's
    # teardown (see process_exit)
    exit_process(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
