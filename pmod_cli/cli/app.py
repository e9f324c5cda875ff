"""The ``pmod`` Typer app: the commands mounted in pipeline order, ``--version`` and ``main``."""

import sys
from typing import Annotated

import typer

from ..errors import UserError
from ..process_exit import exit_process
from . import arank, convert, data, demo, evaluate, flops, train, visualize
from .output import command_logging, error_line, usage_error_line

# `pmod --help` lists the commands in the order a user meets them, from a checkpoint or data to
# training, evaluation and inspection (a command missing here goes last)
PIPELINE = (
    "convert",
    "data",
    "recipes",
    "pretrain",
    "sft",
    "eval",
    "flops",
    "visualize",
    "chat",
    "demo",
    "arank",
)

# Typer tags each argument with its Python type (`CHECKPOINT <list[Path]>`); the metavar every
# argument here has says what to give, as it does for options
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None


class _PipelineOrder(typer.core.TyperGroup):
    """Commands in ``PIPELINE`` order (Typer lists groups such as ``data`` after all commands)."""

    def list_commands(self, ctx) -> list[str]:
        rank = {name: index for index, name in enumerate(PIPELINE)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))


def _print_version(value: bool) -> None:
    if not value:
        return
    from ..provenance import package_versions
    from ..runtime import sentencepiece_problem

    versions = package_versions()
    others = [
        f"{name.replace('_', '-')} {v}" for name, v in versions.items() if name != "pmod" and v
    ]
    typer.echo(f"pmod {versions['pmod']} ({', '.join(others)})")
    if problem := sentencepiece_problem():
        typer.echo(f"warning: {problem}", err=True)
    raise typer.Exit()


def pmod(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print the versions of pmod, torch, transformers and lmms-eval, and exit.",
        ),
    ] = False,
) -> None:
    """p-MoD for LLaVA-family models: convert, train, evaluate, count FLOPs, visualise."""


app = typer.Typer(
    name="pmod",
    cls=_PipelineOrder,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help text: no panels, and rich is not imported to print it
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
app.callback()(pmod)
app.command()(convert.convert)
app.add_typer(data.data_app, name="data")
app.command()(train.recipes)
app.command()(train.pretrain)
app.command()(train.sft)
app.command("eval")(evaluate.evaluate)
app.command()(flops.flops)
app.command()(visualize.visualize)
app.command()(evaluate.chat)
app.command()(demo.demo)
app.command()(arank.arank)


def main() -> None:
    """The ``pmod`` command: user errors of any kind end in one ``error:`` line and exit code 2."""
    # reports record the command as it can be typed again (`pmod ...`, also under python -m);
    # the deepspeed launcher adds --local_rank=N, which LOCAL_RANK in the environment also says
    local_rank = ("--local_rank=", "--local-rank=")
    sys.argv = ["pmod", *(arg for arg in sys.argv[1:] if not arg.startswith(local_rank))]
    with command_logging():
        try:
            code = app(prog_name="pmod", standalone_mode=False)
        except UserError as err:
            code = error_line(str(err))
            code = getattr(err, "exit_code", code)  # a run stopped by a signal: 128 + its number
        except typer.TyperException as err:  # click's exceptions, which Typer vendors
            code = usage_error_line(err)
        except typer.Abort:
            code = error_line("aborted")
    # a process of a torchrun / deepspeed run must not meet gloo's threads in the interpreter's
    # teardown (see process_exit)
    exit_process(code if isinstance(code, int) else 0)
