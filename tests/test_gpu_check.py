"""scripts/gpu_check.sh on a machine without a GPU: it says so, and its steps and table work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# scripts/gpu_check.sh's steps at toy size in subprocesses
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_it_says_so_and_exits_0():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA GPU" in result.stdout and "nothing was checked" in result.stdout


def test_every_step_runs_at_toy_size_on_the_cpu(tmp_path):
    """``--cpu-smoke``: the benchmark (smoke preset), the cuda-marked tests (all skipped here),
    a LoRA sft of the tiny recipe and its eval, as they run on a GPU, then the one table."""
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    command = ["bash", "scripts/gpu_check.sh", "--cpu-smoke", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {step["name"].split(" (")[0]: step["status"] for step in report["steps"]}
    assert status == {
        "bench": "ok",
        "equivalence tests": "skipped",  # every test is marked cuda
        "sft LoRA": "ok",
        "eval": "ok",
    }
    rows = {row[0] for step in report["steps"] for row in step["rows"]}
    assert {"prefill_s: dense / p-MoD", "loss first -> last", "peak memory", "exact match"} <= rows
    skipped = next(step for step in report["steps"] if step["name"].startswith("equivalence"))
    assert skipped["rows"][0][1].endswith("skipped") and "passed" not in skipped["rows"][0][1]
    assert "pmod GPU check on CPU (smoke)" in result.stdout  # the table
    quoted = (tmp_path / "gpu_check.md").read_text().splitlines()  # the same, for the README
    assert quoted[0].startswith("**pmod GPU check on CPU (smoke)")
    assert len([line for line in quoted if line.startswith("| bench")]) == 1
    assert (tmp_path / "sft_lora" / "config.json").is_file()  # the LoRA run's merged model
