"""The flags several commands share, declared once as ``Annotated`` aliases.

A command writes ``as_json: Json = False`` or ``device: Device = None``; where a flag's help must
say something about the one command (what ``--output`` writes, what ``--dtype`` sets) the
``*_option`` functions build it with the shared spelling, metavar and wording. Conventions:
``--output/-o FILE`` for a command's one output file, ``--json`` for one JSON object on stdout,
``--device`` where a model runs and ``--dtype`` where a precision is taken (both read by
``pmod_cli.runtime``), an upper-case metavar for every value.
"""

from typing import Annotated, Any

import typer

# ---- output, device, precision ------------------------------------------------------------

DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)."
DTYPE_SPELLINGS = "bf16 (bfloat16), fp16 (float16), fp32 (float32)"

Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")
]
Device = Annotated[str | None, typer.Option("--device", metavar="DEVICE", help=DEVICE_HELP)]


def device_option(help: str = DEVICE_HELP) -> Any:
    return typer.Option("--device", metavar="DEVICE", help=help)


def output_option(help: str) -> Any:
    return typer.Option("--output", "-o", metavar="FILE", help=help)


def dtype_option(what: str, auto: str = "the checkpoint's own") -> Any:
    return typer.Option(
        "--dtype", metavar="DTYPE", help=f"{what}: {DTYPE_SPELLINGS} or auto ({auto})."
    )


MaxNewTokens = Annotated[
    int, typer.Option("--max-new-tokens", metavar="N", help="Longest answer, in tokens.")
]

# ---- p-MoD's retention ratios (pmod convert, pmod flops) ----------------------------------

BETA_HELP = "PRD shift (default 0.5): 0.5 keeps layers 0-7 dense at 32 layers."

Beta = Annotated[float | None, typer.Option("--beta", metavar="BETA", help=BETA_HELP)]
Betas = Annotated[
    list[float] | None,
    typer.Option("--beta", metavar="BETA", help=BETA_HELP + " Repeat to compare."),
]
Schedule = Annotated[
    str | None,
    typer.Option(
        "--schedule",
        metavar="NAME",
        help="cosine (PRD), linear, stepped, constant, interleaved, cosine31, ... (see docs/model.md).",
    ),
]
MinRatio = Annotated[
    float | None,
    typer.Option(
        "--min-ratio", metavar="R", help="Lowest retention ratio of a MoD layer (default 0.15)."
    ),
]
MaxRatio = Annotated[
    float | None,
    typer.Option("--max-ratio", metavar="R", help="Above it a layer stays dense (default 0.85)."),
]
Count = Annotated[
    str,
    typer.Option(
        "--count",
        metavar="MODE",
        help="TFLOPs count: paper (the paper's profiler) or full (+ attention, vision tower, "
        "projector).",
    ),
]

# ---- token-reduction methods (pmod flops, pmod eval, pmod demo) ---------------------------
# one syntax, parsed by pmod_cli.model.methods

METHOD_HELP = (
    "Token-reduction methods next to p-MoD, NAME[:key=value,...], comma-separated or repeated: "
    "pmod, dense, fastv, random, pool, pdrop, visionzip, sparsevlm, dart, downsample (e.g. "
    "fastv:layer=2,ratio=0.5; docs/baselines.md lists every option)."
)


def method_option(lead: str = "") -> Any:
    """``--method``; ``lead`` says what the command does with the methods."""
    return typer.Option("--method", metavar="NAME[:KEY=VALUE,...]", help=lead + METHOD_HELP)


Methods = Annotated[list[str] | None, method_option()]


def match_tflops_option(what: str) -> Any:
    """``--match-tflops``; ``what`` is the p-MoD cost the methods are solved to match."""
    return typer.Option(
        "--match-tflops",
        help=f"Solve each method's knob (FastV's ratio, pool's tokens) to match {what}.",
    )


# ---- recipes (pmod pretrain, pmod sft) -----------------------------------------------------

RecipeArg = Annotated[
    str,
    typer.Argument(
        metavar="RECIPE",
        help="A recipe shipped with pmod, by name (see `pmod recipes`), or a recipe TOML file "
        "with the sections model, pmod, data, train and (optional) lora (see docs/recipes.md).",
    ),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="SECTION.KEY=VALUE",
        help="Override a recipe key (repeatable), e.g. --set train.max_steps=20.",
    ),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue exactly from the last checkpoint-N in train.output_dir."
    ),
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Check the recipe and every data sample, print the plan (parts, schedule, TFLOPs); "
        "train nothing.",
    ),
]
