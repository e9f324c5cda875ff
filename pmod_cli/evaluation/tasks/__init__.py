"""lmms-eval tasks shipped with pmod: the tiny synthetic set's held-out split (offline), the tiny
media set's held-out videos and image pairs (``pmod_tiny_video``, ``pmod_tiny_multi_image``, offline) and the ``pmod_paper14`` group of the
paper's 14 benchmarks.

``TASKS_DIR`` is the directory to give lmms-eval as an include path;
``python -m pmod_cli.evaluation.tasks`` prints it, for
``python -m lmms_eval --include_path "$(python -m pmod_cli.evaluation.tasks)" ...``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
