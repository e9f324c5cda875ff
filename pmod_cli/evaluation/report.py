"""The `pmod eval` table: tasks as rows, checkpoints as columns, then the efficiency rows."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from .measure import MEMORY_KINDS
from .run import EvalReport

MEMORY_LABELS = {"cuda": "peak memory (CUDA)", "cpu": "peak RSS growth (CPU)"}


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_tflops(value: float) -> str:
    """Paper-scale models have tens of TFLOPs, tiny ones millionths: keep 3 significant digits."""
    return f"{value:.2f}" if value >= 0.01 else f"{value:.3g}"


def format_seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.2f} s"


def report_table(report: EvalReport) -> Table:
    """Tasks as rows (score ± stderr), checkpoints as columns, then the efficiency rows."""
    table = Table(
        title=f"pmod eval: {', '.join(report.tasks)}"
        + (f" (limit {report.limit})" if report.limit else "")
    )
    table.add_column("")
    for result in report.checkpoints:
        table.add_column(
            escape(result.label), justify="right"
        )  # a label is text, never rich markup
    _add_score_rows(table, report)
    table.add_section()
    efficiencies = [result.efficiency for result in report.checkpoints]
    _add_efficiency_rows(table, efficiencies)
    table.caption = _caption(efficiencies)
    return table


def _add_score_rows(table: Table, report: EvalReport) -> None:
    for task in report.task_rows:
        metric = next(r.scores[task].metric for r in report.checkpoints if task in r.scores)
        cells = []
        for result in report.checkpoints:
            score = result.scores.get(task)
            if score is None:
                cells.append("-")
            else:
                error = f" ± {score.stderr:.4f}" if score.stderr else ""
                cells.append(f"{score.value:.4f}{error}")
        table.add_row(f"{task} ({metric})", *cells)


def _add_efficiency_rows(table: Table, efficiencies: list) -> None:
    """One row per measure; "-" for a checkpoint that measured nothing."""

    def row(name: str, render) -> None:
        table.add_row(name, *(render(e) if e is not None else "-" for e in efficiencies))

    count = next((e.flops_count for e in efficiencies if e is not None), "paper")
    row(
        f"TFLOPs ({count} count), vs dense",
        lambda e: f"{format_tflops(e.tflops)} ({e.tflops_ratio:.1%})",
    )
    row(
        "KV cache per sample, vs dense",
        lambda e: f"{human_bytes(e.kv_cache_bytes)} ({e.kv_cache_ratio:.1%})",
    )
    row("prefill latency (mean)", lambda e: format_seconds(e.prefill_latency_s))
    row("end-to-end latency (mean)", lambda e: format_seconds(e.end_to_end_latency_s))
    kinds = {e.memory_kind for e in efficiencies if e is not None}
    memory_label = MEMORY_LABELS[kinds.pop()] if len(kinds) == 1 else "peak memory"
    row(memory_label, lambda e: human_bytes(e.peak_memory_bytes))
    row("V + T tokens (mean)", lambda e: f"{e.mean_vision_tokens:.1f} + {e.mean_text_tokens:.1f}")
    row(
        "requests measured",
        lambda e: (
            f"{e.samples} (batch {e.batch_size}, {e.device}"
            + (f", {e.processes} processes)" if e.processes > 1 else ")")
        ),
    )


def _caption(efficiencies: list) -> str:
    return (
        "TFLOPs: the `pmod flops` formula at the mean measured V and T. KV cache: held after prefill; "
        "dense = (T + V) entries in every layer for the same prompts. Latency at batch > 1 is the "
        "batch's. "
        + "; ".join(
            f"{MEMORY_LABELS[kind]}: {MEMORY_KINDS[kind]}"
            for kind in sorted({e.memory_kind for e in efficiencies if e})
        )
        + "."
    )
