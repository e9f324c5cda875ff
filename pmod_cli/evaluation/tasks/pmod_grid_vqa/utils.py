"""Functions of the pmod_grid_vqa task (loaded by lmms-eval from the task YAML, as a file, so the
import is absolute): the held-out records have the tiny set's layout, so its functions serve."""

from __future__ import annotations

from pmod_cli.evaluation.tasks.pmod_tiny_vqa.utils import (
    doc_to_text,
    doc_to_visual,
    normalise,
    process_docs,
    process_results,
)

__all__ = ["doc_to_text", "doc_to_visual", "normalise", "process_docs", "process_results"]
