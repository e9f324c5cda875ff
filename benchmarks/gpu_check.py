"""The GPU check: what a machine with CUDA must show before pmod's GPU paths are trusted.

    bash scripts/gpu_check.sh                      # on a CUDA machine: under 10 minutes on one H100
    python benchmarks/gpu_check.py --out runs/gpu_check

Steps, each a subprocess with its own time limit (a failed or timed-out step is a row saying so,
and the others still run):

1. bench: ``benchmarks/bench_core.py --preset gpu`` (LLaVA-NeXT-7B shape, bf16): prefill, a
   training step, KV cache bytes and peak memory, p-MoD against dense;
2. equivalence: the ``cuda``-marked tests (``tests/test_gpu.py``) in bf16 with sdpa and, when
   flash-attn is installed, flash_attention_2 (its varlen path against sdpa);
3. sft: a short bf16 run of the tiny recipes (pretrain, then sft), the same with ``[lora]``, and
   with ``lora.qlora`` when bitsandbytes is installed;
4. eval: ``pmod eval`` of the sft model on 50 held-out questions.

Then one table, also written as ``<out>/gpu_check.md`` (for the README to quote) and
``<out>/gpu_check.json``. Without CUDA it says so and exits 0;
``--cpu-smoke`` instead runs every step at toy size on the CPU (the check's own test).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 600


@dataclass
class Step:
    name: str
    status: str  # "ok" | "failed" | "timeout" | "skipped"
    seconds: float
    rows: list[tuple[str, str]] = field(default_factory=list)  # (what, measured)
    note: str = ""


@dataclass
class Settings:
    out: Path
    smoke: bool  # toy sizes on the CPU

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @property
    def precision(self) -> str:
        return "fp32" if self.smoke else "bf16"


def run(
    command: list[str], timeout: float, log: Path, stdout: Path | None = None
) -> tuple[str, float]:
    """Run ``command`` from the repository root; its output goes to ``log`` (its standard
    output to ``stdout`` when given)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    with log.open("w") as errors, (stdout or log).open("a") as output:
        try:
            code = subprocess.run(
                command, cwd=ROOT, env=env, stdout=output, stderr=errors, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - started
    return ("ok" if code == 0 else "failed"), time.perf_counter() - started


def pmod(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "pmod_cli", *arguments]


def overrides(values: dict[str, object]) -> list[str]:
    return [part for key, value in values.items() for part in ("--set", f"{key}={value}")]


# ---- the steps ----------------------------------------------------------------------------


def bench_step(settings: Settings) -> Step:
    log = settings.out / "bench.log"
    preset = ["--preset", "smoke"] if settings.smoke else ["--preset", "gpu", "--repeats", "5"]
    command = [sys.executable, "benchmarks/bench_core.py", *preset, "--json"]
    output = settings.out / "bench.json"
    output.unlink(missing_ok=True)
    status, seconds = run(command, 240, log, stdout=output)
    step = Step("bench (prefill, train step, KV, memory)", status, seconds)
    if status == "ok":
        report = json.loads(output.read_text())
        step.note = f"{report['device']}, V={report['vision_tokens']} T={report['text_tokens']}"
        for key, ratio in report["pmod_over_dense"].items():
            dense, pmod_value = report["dense"][key], report["pmod"][key]
            shown = (
                f"{dense * 1e3:.1f} / {pmod_value * 1e3:.1f} ms"
                if key.endswith("_s")
                else f"{_bytes(dense)} / {_bytes(pmod_value)}"
            )
            step.rows.append((f"{key}: dense / p-MoD", f"{shown} (ratio {ratio:.3f})"))
    return step


def equivalence_step(settings: Settings) -> Step:
    xml = settings.out / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_gpu.py"]
    command += ["-p", "no:cacheprovider", f"--junitxml={xml}"]
    status, seconds = run(command, 240, settings.out / "equivalence.log")
    step = Step("equivalence tests (bf16; sdpa, flash_attention_2)", status, seconds)
    if xml.is_file():
        counts = junit_counts(xml)
        step.rows.append(("tests", ", ".join(f"{n} {what}" for what, n in counts.items() if n)))
        if status == "failed" and not counts["failed"] and not counts["errors"]:
            step.status = "ok"  # pytest exits 5 when every test is skipped
        if counts["passed"] == 0 and not counts["failed"] and not counts["errors"]:
            step.status = "skipped"
    step.note = "flash-attn " + (
        "installed" if importlib.util.find_spec("flash_attn") else "absent"
    )
    return step


def junit_counts(xml: Path) -> dict[str, int]:
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0))
    errors, skipped = int(suite.get("errors", 0)), int(suite.get("skipped", 0))
    return {
        "passed": total - failed - errors - skipped,
        "failed": failed,
        "errors": errors,
        "skipped": skipped,
    }


def sft_steps(settings: Settings) -> list[Step]:
    out, steps = settings.out, []
    common = {
        "train.precision": settings.precision,
        "train.overwrite_output_dir": "true",
        "train.logging_steps": 1 if settings.smoke else 10,
    }
    size = (
        {"train.global_batch_size": 4, "train.per_device_batch_size": 4} if settings.smoke else {}
    )
    if settings.smoke:  # a fresh connector: no pretrain stage at toy size
        connector = ""
    else:
        connector = str(out / "pretrain")
        pretrain = {**common, "train.output_dir": connector, "train.max_steps": 50}
        command = pmod("pretrain", "recipes/tiny_pretrain.toml", *overrides(pretrain))
        status, seconds = run(command, 240, out / "pretrain.log")
        steps.append(summary_step("pretrain (tiny, 50 steps)", status, seconds, Path(connector)))
    lora = {"lora.enabled": "true", "lora.r": 16, "lora.alpha": 32}
    # at toy size the LoRA run alone: it takes every path the plain one takes, and more
    runs = [("sft LoRA", lora)] if settings.smoke else [("sft", {}), ("sft LoRA", lora)]
    if importlib.util.find_spec("bitsandbytes") is not None and not settings.smoke:
        runs.append(("sft QLoRA", {"lora.enabled": "true", "lora.r": 16, "lora.qlora": "true"}))
    max_steps = 2 if settings.smoke else 100
    for name, extra in runs:
        directory = out / name.replace(" ", "_").lower()
        values = {
            **common,
            **size,
            **extra,
            "train.output_dir": directory,
            "train.max_steps": max_steps,
            "train.report_to": "tensorboard",
            "model.pretrained_connector": connector,
        }
        command = pmod("sft", "recipes/tiny.toml", *overrides(values))
        status, seconds = run(command, 300, out / f"{directory.name}.log")
        steps.append(summary_step(f"{name} (tiny, {max_steps} steps)", status, seconds, directory))
    return steps


def summary_step(name: str, status: str, seconds: float, directory: Path) -> Step:
    step = Step(name, status, seconds)
    summary_file = directory / "summary.json"
    if status != "ok" or not summary_file.is_file():
        return step
    summary = json.loads(summary_file.read_text())
    step.rows += [
        ("loss first -> last", f"{summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"),
        (
            "samples/s, tokens/s",
            f"{summary['samples_per_second']:.1f}, {summary['tokens_per_second']:.0f}",
        ),
        (
            "TFLOP/s per process, MFU",
            f"{summary['train_tflops_per_second']:.3g}, {_share(summary['mfu'])}",
        ),
        ("peak memory", f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB"),
    ]
    return step


def eval_step(settings: Settings) -> Step:
    model = settings.out / ("sft_lora" if settings.smoke else "sft")
    report = settings.out / "eval.json"
    limit = "2" if settings.smoke else "50"
    command = pmod("eval", str(model), "--tasks", "pmod_tiny_vqa", "--limit", limit)
    command += ["--batch-size", "8", "--device", settings.device, "--output", str(report)]
    if not (model / "config.json").is_file():
        return Step("eval (tiny sft model)", "skipped", 0.0, note=f"no model in {model}")
    status, seconds = run(command, 180, settings.out / "eval.log")
    step = Step(f"eval ({model.name} model, {limit} questions)", status, seconds)
    if status == "ok":
        result = json.loads(report.read_text())["checkpoints"][0]
        score = result["scores"]["pmod_tiny_vqa"]["value"]
        efficiency = result["efficiency"]
        step.rows += [
            ("exact match", f"{score:.3f}"),
            ("prefill latency (batch 8)", f"{efficiency['prefill_latency_s'] * 1e3:.1f} ms"),
            ("KV cache vs dense", f"{efficiency['kv_cache_vs_dense']:.1%}"),
        ]
    return step


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


# ---- the report ---------------------------------------------------------------------------


def report_table(steps: list[Step], title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("check", "status", "time", "measured", "value"):
        table.add_column(column)
    for step in steps:
        first = True
        for what, value in step.rows or [("", step.note)]:
            table.add_row(
                step.name if first else "",
                step.status if first else "",
                f"{step.seconds:.0f} s" if first else "",
                what,
                value,
            )
            first = False
        if step.rows and step.note:
            table.add_row("", "", "", "note", step.note)
    return table


def markdown_table(steps: list[Step], title: str) -> str:
    """The summary as a Markdown table, for the README to quote (``<out>/gpu_check.md``)."""
    lines = [
        f"**{title}**",
        "",
        "| check | status | time | measured | value |",
        "|---|---|---|---|---|",
    ]
    for step in steps:
        rows = step.rows or [("", step.note)]
        for index, (what, value) in enumerate(rows):
            head = (step.name, step.status, f"{step.seconds:.0f} s") if index == 0 else ("", "", "")
            lines.append("| " + " | ".join([*head, what, value]).replace("\n", " ") + " |")
        if step.rows and step.note:
            lines.append(f"| | | | note | {step.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="every step at toy size on the CPU"
    )
    args = parser.parse_args(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA GPU here, so nothing was checked; run it on a GPU machine"
        )
        return 0
    settings = Settings(out=args.out.resolve(), smoke=args.cpu_smoke)
    settings.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = [
        bench_step(settings),
        equivalence_step(settings),
        *sft_steps(settings),
        eval_step(settings),
    ]
    total = time.perf_counter() - started
    device = "CPU (smoke)" if settings.smoke else torch.cuda.get_device_name()
    title = f"pmod GPU check on {device}: {total:.0f} s"
    (settings.out / "gpu_check.json").write_text(
        json.dumps(
            {"device": device, "seconds": total, "steps": [asdict(s) for s in steps]}, indent=2
        )
    )
    (settings.out / "gpu_check.md").write_text(markdown_table(steps, title))
    from rich.console import Console

    Console(width=160).print(report_table(steps, title))
    if total > TOTAL_BUDGET_S:
        print(f"gpu_check: took {total:.0f} s, more than the {TOTAL_BUDGET_S} s it should")
    failed = [step.name for step in steps if step.status in ("failed", "timeout")]
    if failed:
        print(
            f"gpu_check: {len(failed)} step(s) failed ({'; '.join(failed)}); logs in {settings.out}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
