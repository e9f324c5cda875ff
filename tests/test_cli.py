"""The command line as a user meets it: start-up without the ML stack, one error style,
colours only on a terminal, the version, shell completion and flags spelled alike."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import typer

import pmod_cli
from pmod_cli.cli import app
from pmod_cli.errors import UserError
from pmod_cli.runtime import parse_dtype

ROOT = Path(__file__).resolve().parents[1]
PMOD = [sys.executable, "-m", "pmod_cli"]
HEAVY = {"torch", "transformers", "lmms_eval", "deepspeed", "matplotlib", "PIL"}
ANSI = "\x1b["


def pmod_env(**extra: str) -> dict:
    env = {
        key: value for key, value in os.environ.items() if key not in ("NO_COLOR", "FORCE_COLOR")
    }
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout first
    return {**env, "PYTHONPATH": path, **extra}


def run_pmod(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``pmod ARGS`` in a fresh interpreter that reports every module it imports (-X importtime)."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pmod_cli", *args],
        capture_output=True,
        text=True,
        env=pmod_env(**env),
        timeout=120,
    )


def split_stderr(stderr: str) -> tuple[set[str], list[str]]:
    """(top-level packages imported, the other stderr lines)."""
    modules, lines = set(), []
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[1].strip().split(".")[0])
        else:
            lines.append(line)
    return modules, lines


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["-h"],
        ["flops", "--help"],
        ["eval", "-h"],
        ["visualize", "--help"],
        ["sft", "-h"],
    ],
)
def test_help_answers_without_the_ml_stack(args):
    result = run_pmod(*args)
    modules, lines = split_stderr(result.stderr)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: pmod") and lines == []
    assert "pmod_cli" in modules and not HEAVY & modules, HEAVY & modules
    # plain help: option values named by upper-case metavars, no type tags like <int>
    assert not re.search(r"<[a-z][a-zA-Z\[\]]*>", result.stdout), result.stdout


def test_help_lists_the_commands_in_pipeline_order():
    """From a checkpoint and data to training, evaluation and inspection; a new command must
    take its place here (and in pmod_cli.cli.app.PIPELINE)."""
    result = run_pmod("--help")
    listed = result.stdout.split("Commands:\n", 1)[1].splitlines()
    names = [match[1] for line in listed if (match := re.match(r"  (\S+) ", line))]
    assert names == [
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
    ]


def test_version_names_the_installed_stack_without_importing_it():
    result = run_pmod("--version")
    modules, lines = split_stderr(result.stderr)
    assert result.returncode == 0 and lines == []
    assert not HEAVY & modules
    expected = (
        f"pmod {pmod_cli.__version__} (torch {metadata.version('torch')}, "
        f"transformers {metadata.version('transformers')}, lmms-eval {metadata.version('lmms_eval')})"
    )
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["arank", "ckpt", "--data", "d.json", "--samples", "many"],
            "invalid value for '--samples'",
        ),
        (["flops", "--bogus"], "no such option: --bogus"),
        (["visualize"], "missing argument 'IMAGE'"),
        (["eval", "ckpt"], "missing option '--tasks'"),
        (["nosuch"], "no such command 'nosuch'"),
    ],
)
def test_argument_errors_are_one_line_exit_2_without_the_ml_stack(args, message):
    result = run_pmod(*args)
    modules, lines = split_stderr(result.stderr)
    assert result.returncode == 2 and result.stdout == ""
    assert len(lines) == 1, lines  # no usage block, no boxed panel, no traceback
    assert lines[0].startswith("error: ") and message in lines[0]
    command = "pmod" if args[0] == "nosuch" else f"pmod {args[0]}"
    assert lines[0].endswith(f"(see '{command} --help')")
    assert ANSI not in result.stderr  # stderr is a pipe here: no colour
    assert not HEAVY & modules


def test_shell_completion_is_typers_and_light():
    result = run_pmod(_PMOD_COMPLETE="complete_bash", COMP_WORDS="pmod fl", COMP_CWORD="1")
    modules, _ = split_stderr(result.stderr)
    assert result.returncode == 0 and result.stdout.split() == ["flops"]
    assert not HEAVY & modules
    assert "--install-completion" in run_pmod("--help").stdout


def stderr_on_a_terminal(*args: str, **env: str) -> str:
    """What ``pmod ARGS`` writes to stderr when stderr is a terminal (a pseudo-terminal here)."""
    controller, terminal = pty.openpty()
    try:
        subprocess.run(
            [*PMOD, *args],
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            env=pmod_env(**env),
            timeout=120,
        )
    finally:
        os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the terminal side is closed and everything is read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return b"".join(chunks).decode()


def test_errors_are_coloured_on_a_terminal_unless_no_color():
    coloured = stderr_on_a_terminal("flops", "--bogus")
    assert "error:" in coloured and ANSI in coloured
    plain = stderr_on_a_terminal("flops", "--bogus", NO_COLOR="1")
    assert "error: no such option: --bogus" in plain and ANSI not in plain


def test_flags_are_spelled_alike_across_commands():
    group = typer.main.get_command(app)
    commands = group.commands
    takes = {
        flag: {
            name
            for name, command in commands.items()
            if any(flag in p.opts for p in command.params)
        }
        for flag in ("--json", "--device", "--dtype", "--output")
    }
    assert {"flops", "visualize", "arank", "eval"} <= takes["--json"]
    assert {"flops", "visualize", "arank", "eval"} <= takes[
        "--device"
    ]  # every command running a model
    assert {"flops", "arank", "eval"} <= takes["--dtype"]
    for name, command in commands.items():
        for param in command.params:
            if "--output" in param.opts:
                assert "-o" in param.opts, f"pmod {name} --output has no -o"
            takes_value = isinstance(param, typer.core.TyperArgument) or not param.is_flag
            if takes_value and param.name != "help":
                assert param.metavar and param.metavar.upper() == param.metavar, (name, param.opts)


@pytest.mark.parametrize(
    "spellings,name",
    [
        (("bf16", "bfloat16", "BF16"), "bf16"),
        (("fp16", "float16"), "fp16"),
        (("fp32", "float32"), "fp32"),
    ],
)
def test_one_dtype_parser_reads_every_spelling(spellings, name):
    assert {parse_dtype(spelling) for spelling in spellings} == {name}
    assert parse_dtype("auto") == "auto" and parse_dtype("fp8", extra=("fp8",)) == "fp8"
    with pytest.raises(UserError, match="--dtype must be one of bf16, bfloat16, .* got 'int4'"):
        parse_dtype("int4")
    with pytest.raises(UserError):
        parse_dtype("fp8")  # only where a command allows it
