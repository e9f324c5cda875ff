"""The ``pmod`` command line: parses arguments and calls into the package, nothing more."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from .errors import UserError

app = typer.Typer(
    name="pmod",
    help="p-MoD for LLaVA-family models: convert, train, evaluate, count FLOPs, visualise.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_METHOD_HELP = "pmod, dense, fastv, random, pool (comma-separated or repeated): training-free baselines next to p-MoD."
_FASTV_LAYER_HELP = (
    "FastV's K: layers 0..K-1 see every token, the rest the top-ranked ones (default 2)."
)
_FASTV_RATIO_HELP = (
    "FastV's R, the FRACTION OF VISION TOKENS DROPPED after layer K, in (0, 1] (default 0.5)."
)
_FASTV_SCORE_HELP = "FastV's ranking: last (the last prompt token's attention, its code) or mean (all prompt tokens)."
_POOL_HELP = "pool: vision tokens per image after average pooling over the patch grid (at most V)."
_SEED_HELP = "random: the seed of the draw (default 0)."


def _split_methods(values: list[str] | None) -> list[str]:
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


@app.command()
def flops(
    model: str = typer.Option(
        None, "--model", help="Preset (default llava-next-7b); see docs/flops.md."
    ),
    config: str = typer.Option(
        None, "--config", help="HF config.json or checkpoint dir, dense or p-MoD."
    ),
    beta: list[float] = typer.Option(
        None, "--beta", help="PRD shift (default 0.5); repeat to compare."
    ),
    schedule: str = typer.Option(
        None, "--schedule", help="cosine (PRD), linear, stepped, constant, interleaved."
    ),
    min_ratio: float = typer.Option(
        None, "--min-ratio", help="Lowest ratio of a MoD layer (default 0.15)."
    ),
    max_ratio: float = typer.Option(
        None, "--max-ratio", help="Above it a layer stays dense (default 0.85)."
    ),
    vision_tokens: int = typer.Option(
        None, "--vision-tokens", help="V (default: the largest image layout)."
    ),
    text_tokens: int = typer.Option(None, "--text-tokens", help="T (default 58, as in the paper)."),
    count: str = typer.Option(
        "paper",
        "--count",
        help="paper (the paper's profiler) or full (+ attention, vision tower, projector).",
    ),
    dtype: str = typer.Option("bf16", "--dtype", help="KV cache dtype: bf16, fp16, fp32, fp8."),
    routed_tokens: str = typer.Option(
        None,
        "--routed-tokens",
        help="vision (p-MoD) or all (gamma-MoD: prompt text before the image competes too).",
    ),
    prefix_text_tokens: int = typer.Option(
        None,
        "--prefix-text-tokens",
        help="With routed tokens all: text tokens up to the image that compete (default 35).",
    ),
    calibration: Path = typer.Option(
        None,
        "--calibration",
        help="LLaVA JSON/JSONL samples: run --config CHECKPOINT on them and count the measured ratios.",
    ),
    calibration_samples: int = typer.Option(
        None, "--calibration-samples", help="Samples to measure (default 16)."
    ),
    image_folder: Path = typer.Option(
        None,
        "--image-folder",
        help="With --calibration: the directory its image paths are relative to (default: its own).",
    ),
    method: list[str] = typer.Option(None, "--method", help=_METHOD_HELP),
    fastv_layer: int = typer.Option(None, "--fastv-layer", help=_FASTV_LAYER_HELP),
    fastv_ratio: float = typer.Option(None, "--fastv-ratio", help=_FASTV_RATIO_HELP),
    fastv_score: str = typer.Option(None, "--fastv-score", help=_FASTV_SCORE_HELP),
    pool_tokens: int = typer.Option(None, "--pool-tokens", help=_POOL_HELP),
    seed: int = typer.Option(None, "--seed", help=_SEED_HELP),
    match_tflops: bool = typer.Option(
        False,
        "--match-tflops",
        help="Solve FastV's R and pool's N to match the (first) p-MoD setting's TFLOPs.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    plot: str = typer.Option(None, "--plot", help="Draw retention ratio vs layer into this PNG."),
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
        methods=_split_methods(method),
        fastv_layer=fastv_layer,
        fastv_ratio=fastv_ratio,
        fastv_score=fastv_score,
        pool_tokens=pool_tokens,
        seed=seed,
        match_tflops=match_tflops,
    )
    if plot is not None:
        from .efficiency.plot import plot_retention_ratios

        plot_retention_ratios(plan, plot)
    if as_json:
        typer.echo(json.dumps({**plan_to_json(plan), "plot": plot}))
        return
    from .efficiency.report import print_plan

    print_plan(plan)
    if plot is not None:
        typer.echo(f"plot written to {plot}")


@app.command()
def visualize(
    image: Path = typer.Argument(..., help="The image to route (PNG, JPEG, ...)."),
    checkpoint: Path = typer.Option(
        None,
        "--checkpoint",
        help="p-MoD checkpoint directory (default: the tiny default's runs/tiny/sft).",
    ),
    layers: str = typer.Option(
        None,
        "--layers",
        help="Comma-separated decoder layers, e.g. 2,14,26 (default: 4 MoD layers, first to last).",
    ),
    prompt: str = typer.Option(
        None, "--prompt", help="The question asked with the image (default: Describe the image.)."
    ),
    output: Path = typer.Option(
        None, "--output", help="Figure file (default: <image stem>_pmod.png)."
    ),
    matrix: bool = typer.Option(
        False, "--matrix", help="Add the layers x vision-token matrix (the paper's Figure 6)."
    ),
    heatmap: bool = typer.Option(
        False, "--heatmap", help="Colour patches by router weight instead of kept/skipped."
    ),
) -> None:
    """Show which image patches each p-MoD layer keeps: a figure and a table of kept counts."""
    from rich.console import Console

    from .visualization.visualize import kept_table, visualize_routing

    result = visualize_routing(
        image,
        checkpoint=checkpoint,
        layers=layers,
        prompt=prompt,
        output=output,
        matrix=matrix,
        heatmap=heatmap,
    )
    Console().print(kept_table(result.selection, result.layers))
    typer.echo(f"figure written to {result.output}")


@app.command()
def convert(
    source: Path = typer.Argument(
        ..., help="A LLaVA / LLaVA-NeXT checkpoint directory (HF format)."
    ),
    output: Path = typer.Argument(
        ..., help="Where to write the p-MoD checkpoint (a new directory)."
    ),
    beta: float = typer.Option(
        0.5, "--beta", help="PRD shift: 0.5 keeps layers 0-7 dense at 32 layers."
    ),
    schedule: str = typer.Option(
        "cosine", "--schedule", help="cosine (PRD), linear, stepped, constant, interleaved."
    ),
    min_ratio: float = typer.Option(
        0.15, "--min-ratio", help="Lowest retention ratio of a MoD layer."
    ),
    max_ratio: float = typer.Option(0.85, "--max-ratio", help="Above it a layer stays dense."),
) -> None:
    """Convert a LLaVA checkpoint into a p-MoD one (fresh routers: it computes like the original on kept tokens)."""
    from .model.config import PMoDConfig
    from .model.loading import convert_checkpoint

    try:
        config = PMoDConfig(schedule=schedule, beta=beta, min_ratio=min_ratio, max_ratio=max_ratio)
    except ValueError as err:
        raise UserError(str(err)) from None
    written = convert_checkpoint(source, output, config)
    ratios = config.retention_ratios(_num_layers(written))
    typer.echo(f"wrote {written}: {sum(r < 1 for r in ratios)} of {len(ratios)} layers are MoD")


_RECIPE_HELP = "Recipe TOML with the sections model, pmod, data and train (see docs/recipes.md)."
_SET_HELP = "Override a recipe key, section.key=value (repeatable), e.g. --set train.max_steps=20."
_RESUME_HELP = "Continue exactly from the last checkpoint-N in train.output_dir."
_DRY_RUN_HELP = "Check the recipe and every data sample, print the plan (parts, schedule, TFLOPs); train nothing."


@app.command()
def pretrain(
    recipe: Path = typer.Argument(..., help=_RECIPE_HELP),
    overrides: list[str] = typer.Option(None, "--set", help=_SET_HELP),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Stage 1: train the connector on captions (e.g. recipes/tiny_pretrain.toml)."""
    from .training.stages import launch

    launch("pretrain", recipe, overrides or [], resume=resume, dry_run=dry_run)


@app.command()
def sft(
    recipe: Path = typer.Argument(..., help=_RECIPE_HELP),
    overrides: list[str] = typer.Option(None, "--set", help=_SET_HELP),
    resume: bool = typer.Option(False, "--resume", help=_RESUME_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=_DRY_RUN_HELP),
) -> None:
    """Stage 2: p-MoD instruction tuning of connector + LLM + routers (e.g. recipes/tiny.toml)."""
    from .training.stages import launch

    launch("sft", recipe, overrides or [], resume=resume, dry_run=dry_run)


@app.command()
def arank(
    checkpoint: Path = typer.Argument(
        ..., help="A LLaVA / LLaVA-NeXT checkpoint directory, plain HF or p-MoD."
    ),
    data: Path = typer.Option(
        ..., "--data", help="LLaVA-format JSON / JSONL image-question samples."
    ),
    image_folder: Path = typer.Option(
        None,
        "--image-folder",
        help="Directory the samples' image paths are relative to (default: the data file's; tiny:shapes/images for tiny:shapes data).",
    ),
    samples: int = typer.Option(
        16, "--samples", help="How many image-question samples to average over."
    ),
    batch_size: int = typer.Option(4, "--batch-size", help="Samples per forward pass."),
    dense_layers: int = typer.Option(
        4, "--dense-layers", help="K: the K highest-ARank layers stay dense, the rest become MoD."
    ),
    output: Path = typer.Option(
        Path("arank.png"), "--output", help="Where to draw ARank per layer (PNG, PDF, SVG)."
    ),
    dtype: str = typer.Option(
        "float32",
        "--dtype",
        help="Precision of the model and its attention maps: float32, bfloat16, float16, auto.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object instead of the table."
    ),
    save: Path = typer.Option(
        None,
        "--save",
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
    )
    report_arank(result, output, save=save, as_json=as_json)


@app.command("eval")
def evaluate(
    checkpoints: list[Path] = typer.Argument(
        ..., help="p-MoD or plain LLaVA / LLaVA-NeXT checkpoint directories."
    ),
    tasks: str = typer.Option(
        ..., "--tasks", help="Comma-separated lmms-eval tasks, e.g. pmod_tiny_vqa or pmod_paper14."
    ),
    limit: int = typer.Option(
        None, "--limit", help="Evaluate only the first N samples of each task."
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", help="Samples generated together (left padding)."
    ),
    include_path: Path = typer.Option(
        None, "--include-path", help="A directory of extra lmms-eval task YAMLs."
    ),
    output: Path = typer.Option(
        None,
        "--output",
        help="Also write the report (and every measurement) to this JSON file; lmms-eval's own files go to FILE_lmms_eval/.",
    ),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda or cuda:N (default: cuda when available)."
    ),
    count: str = typer.Option(
        "paper", "--count", help="TFLOPs count: paper (as `pmod flops`) or full."
    ),
    method: list[str] = typer.Option(
        None, "--method", help="Run each checkpoint with each of: " + _METHOD_HELP
    ),
    fastv_layer: int = typer.Option(None, "--fastv-layer", help=_FASTV_LAYER_HELP),
    fastv_ratio: float = typer.Option(None, "--fastv-ratio", help=_FASTV_RATIO_HELP),
    fastv_score: str = typer.Option(None, "--fastv-score", help=_FASTV_SCORE_HELP),
    pool_tokens: int = typer.Option(None, "--pool-tokens", help=_POOL_HELP),
    seed: int = typer.Option(None, "--seed", help=_SEED_HELP),
    match_tflops: bool = typer.Option(
        False,
        "--match-tflops",
        help="Solve FastV's R and pool's N on the requests to cost what the checkpoint's p-MoD plan costs.",
    ),
) -> None:
    """Evaluate checkpoints with lmms-eval: accuracy and measured efficiency side by side."""
    from rich.console import Console

    from .evaluation.report import report_table
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
        count=count,
        lmms_eval_dir=lmms_eval_dir_for(output) if output is not None else None,
        methods=methods,
        match_tflops=match_tflops,
    )
    Console().print(report_table(report))
    if output is not None:
        write_json_atomically(report_to_json(report), output)
        typer.echo(f"report written to {output}")


class _WarningLines(logging.Handler):
    """A package warning as one ``warning: ...`` line on stderr (as errors are ``error: ...``)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.secho(f"warning: {record.getMessage()}", fg=typer.colors.YELLOW, err=True)


def _num_layers(checkpoint: Path) -> int:
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    return config["text_config"]["num_hidden_layers"]


def main() -> None:
    # the deepspeed launcher adds --local_rank=N; LOCAL_RANK in the environment says the same
    sys.argv = [arg for arg in sys.argv if not arg.startswith(("--local_rank=", "--local-rank="))]
    # the package's warnings (skipped samples, a missing judge key) as `warning: ...` lines, for
    # this command only: code importing pmod_cli keeps its own logging set-up
    package_logger = logging.getLogger("pmod_cli")
    handler, propagate = _WarningLines(logging.WARNING), package_logger.propagate
    package_logger.addHandler(handler)
    package_logger.propagate = False
    try:
        app()
    except UserError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    finally:
        package_logger.removeHandler(handler)
        package_logger.propagate = propagate


if __name__ == "__main__":
    main()
