"""What the command line writes besides results: one ``error:`` or ``warning:`` line on stderr
(coloured on a terminal), and logging set up so that stdout keeps only results."""

import contextlib
import logging
import os
import sys

import typer


def _paint(text: str, colour: str) -> str:
    """``text`` in ``colour`` when stderr is a terminal and NO_COLOR is not set (no-color.org)."""
    if os.environ.get("NO_COLOR") or not sys.stderr.isatty():
        return text
    return typer.style(text, fg=colour, bold=True)


def error_line(message: str) -> int:
    """Print ``error: MESSAGE`` on stderr; the exit code of a user error (2)."""
    typer.echo(f"{_paint('error:', 'red')} {message}", err=True)
    return 2


def usage_error_line(err: typer.TyperException) -> int:
    """Typer's usage errors (bad value, missing argument, unknown option) as one ``error:`` line."""
    if type(err).__name__ == "NoArgsIsHelpError":  # a bare `pmod`: the help is the answer
        typer.echo(err.format_message())
        return 2
    message = " ".join(line.strip() for line in err.format_message().splitlines() if line.strip())
    message = message[:1].lower() + message[1:].rstrip(".")
    context = getattr(err, "ctx", None)
    command = context.command_path if context is not None else "pmod"
    return error_line(f"{message} (see '{command} --help')")


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
def command_logging():
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
