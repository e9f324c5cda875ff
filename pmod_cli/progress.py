"""The one look of pmod's progress bars (rich): what is running, the bar, done of total, any extra
columns, the time taken and the time left. rich is imported only when a bar is made."""

from __future__ import annotations


def progress_bar(
    *extra: str,
    description: str = "[bold]{task.description}",
    remaining: bool = True,
    stderr: bool = True,
    transient: bool = True,
    disable: bool = False,
):
    """A ``rich.progress.Progress`` to use as a context manager; ``extra`` are text columns (rich
    markup, ``{task.fields[...]}``) between the count and the times. On stderr and gone when done
    by default, so stdout keeps only a command's report and an error leaves only its own line."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(description), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(text) for text in extra]
    columns += [TimeElapsedColumn(), *([TimeRemainingColumn()] if remaining else [])]
    console = Console(stderr=True) if stderr else None
    return Progress(*columns, console=console, transient=transient, disable=disable)
