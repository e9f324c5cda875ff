"""Start-up of the ``pmod`` command against importing the ML stack, measured in one run.

Each command runs as a fresh process, the commands taking turns round after round (so a busy
machine slows all of them alike); per command the median and the best wall time and the peak
RSS of the process are reported, and the ratio of ``pmod --help`` to
``python -c "import torch, transformers"`` is checked against the target (under a quarter).

    .venv/bin/python benchmarks/bench_startup.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_RATIO = 0.25
ROOT = Path(__file__).resolve().parents[1]


def pmod_command() -> list[str]:
    """The ``pmod`` console script beside this interpreter (what users run), else ``-m pmod_cli``."""
    script = Path(sys.executable).parent / "pmod"
    if script.is_file():
        return [str(script)]
    found = shutil.which("pmod")
    return [found] if found else [sys.executable, "-m", "pmod_cli"]


def run_once(command: list[str], env: dict) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit code) of one fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, process.returncode  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds (each runs every command once)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    args = parser.parse_args()

    pmod = pmod_command()
    commands = {
        "pmod --help": [*pmod, "--help"],
        "pmod --version": [*pmod, "--version"],
        "pmod flops --help": [*pmod, "flops", "--help"],
        "pmod arank X --samples abc (usage error)": [
            *pmod,
            "arank",
            "X",
            "--data",
            "Y",
            "--samples",
            "abc",
        ],
        'python -c "import torch, transformers"': [
            sys.executable,
            "-c",
            "import torch, transformers",
        ],
    }
    # the checkout's pmod_cli first, as scripts/test.sh and the tests run it
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    for command in commands.values():  # warm the file cache; not counted
        run_once(command, env)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():
            runs[name].append(run_once(command, env))

    rows = {
        name: {
            "median_s": statistics.median(wall for wall, _, _ in measured),
            "best_s": min(wall for wall, _, _ in measured),
            "peak_rss_mib": max(rss for _, rss, _ in measured),
            "exit_codes": sorted({code for _, _, code in measured}),
        }
        for name, measured in runs.items()
    }
    reference = rows['python -c "import torch, transformers"']["median_s"]
    ratio = rows["pmod --help"]["median_s"] / reference
    result = {
        "repeats": args.repeats,
        "command": pmod,
        "cpus": os.cpu_count(),
        "results": rows,
        "help_vs_import_ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio < TARGET_RATIO,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{'command':45s} {'median s':>9s} {'best s':>8s} {'peak RSS MiB':>13s}  exit")
    for name, row in rows.items():
        codes = ",".join(map(str, row["exit_codes"]))
        print(
            f"{name:45s} {row['median_s']:9.3f} {row['best_s']:8.3f} {row['peak_rss_mib']:13.0f}  {codes}"
        )
    verdict = "met" if result["target_met"] else "MISSED"
    print(
        f"\npmod --help / import torch, transformers = {ratio:.3f} (target < {TARGET_RATIO}: {verdict})"
    )


if __name__ == "__main__":
    main()
