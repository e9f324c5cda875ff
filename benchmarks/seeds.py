"""The seeds study: trained p-MoD, trained PyramidDrop and dense over several training seeds, on the
grid task of ``benchmarks/study.py``, with training-free methods on every dense seed at p-MoD's
TFLOPs. Resumable; its results are data:

    .venv/bin/python benchmarks/seeds.py run --jobs 2          # train and evaluate what is missing
    .venv/bin/python benchmarks/seeds.py report                # the table and the figure

``run`` works through units in a fixed order (seed by seed: dense, p-MoD, PyramidDrop, then the
training-free methods on that dense seed; the longer convergence runs right after the first seed,
so the check is answered before more seeds are spent).
Each finished unit writes one JSON under ``benchmarks/results/seeds/``; a unit whose file exists
is skipped, so an interrupted run continues where it stopped. Checkpoints go to ``runs/seeds/``
(not kept in git): a training-free unit needs its dense seed's checkpoint, and retrains it if it is
gone.

A training unit is ``pmod sft recipes/grid.toml`` with the seed (fresh connector, routers and data
order), a checkpoint every ``steps / 6``, each evaluated on the first ``--curve-questions``
held-out questions (the convergence curve), and the final model on all of them. ``report`` reads
only the JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import PMOD, TASK, correctness  # noqa: E402

from pmod_cli.model.methods import parse_method  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "seeds"
RECIPE = "recipes/grid.toml"
MODELS = ("dense", "pmod", "pdrop")
# not among them, as the grid model refuses them: downsampling (the model is LLaVA-1.5-shaped,
# whose processor resizes every image to the tower's crop, so a smaller image gives no fewer
# tokens) and VisionZip (the grid's vision features are its one-layer tower's embeddings, with no
# attention at the feature layer to rank by)
TRAINING_FREE = ("fastv:layer=2", "random", "sparsevlm", "dart")
CURVE_POINTS = 6


@dataclass
class Settings:
    steps: int
    long_steps: int
    seeds: list[int]
    long_seeds: list[int]
    curve_questions: int
    free_methods: list[str]
    runs: Path
    results: Path
    questions: int | None = None
    batch_size: int = 32
    pdrop_ratio: float | None = None
    lr: float | None = None  # None: the recipe's learning rate
    log: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Unit:
    kind: str  # "train" or "free"
    model: str  # dense, pmod, pdrop (train); the methods' spelling (free)
    seed: int
    steps: int
    lr: float | None = None  # a design with another learning rate than the recipe's

    @property
    def name(self) -> str:
        model = f"free-{self.model.split(':')[0]}" if self.kind == "free" else self.model
        return f"{model}-s{self.seed}-{self.steps}{self.lr_suffix}"

    @property
    def lr_suffix(self) -> str:
        return "" if self.lr is None else f"-lr{self.lr:g}"

    def result_path(self, settings: Settings) -> Path:
        return settings.results / f"{self.name}.json"

    def checkpoint(self, settings: Settings) -> Path:
        """A training unit's output directory (a training-free unit uses its dense seed's)."""
        return settings.runs / self.name


def plan(settings: Settings) -> list[Unit]:
    """Every unit in run order: seed by seed, the convergence runs right after the first seed."""
    units: list[Unit] = []
    for index, seed in enumerate(settings.seeds):
        units += [Unit("train", model, seed, settings.steps, settings.lr) for model in MODELS]
        units += [
            Unit("free", method, seed, settings.steps, settings.lr)
            for method in settings.free_methods
        ]
        if index == 0:
            units += [
                Unit("train", model, seed, settings.long_steps, settings.lr)
                for seed in settings.long_seeds
                for model in MODELS
            ]
    return units


def pending_units(settings: Settings) -> list[Unit]:
    """The units whose result file is not written yet, in run order."""
    return [unit for unit in plan(settings) if not unit.result_path(settings).exists()]


# ---- running pmod -------------------------------------------------------------------------------


class Stopped(Exception):
    """The study was asked to stop (Ctrl-C, SIGTERM) while this unit ran."""


class StopRequest:
    """Ctrl-C or SIGTERM stops the study: the pmod commands under way get SIGTERM (``pmod sft``
    saves a checkpoint at the step under way, which the next run resumes from), no unit starts
    after it, and no result file is written for a unit cut short."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()

    def __call__(self, signum=signal.SIGTERM, frame=None) -> None:
        self.event.set()
        with self.lock:
            for process in self.running:
                process.send_signal(signal.SIGTERM)

    def run(self, command: list[str], **options) -> int:
        """``command``'s exit status; Stopped where a stop came before or while it ran."""
        if self.event.is_set():
            raise Stopped
        process = subprocess.Popen(command, **options)
        with self.lock:
            self.running.add(process)
            if self.event.is_set():  # the request came as it started
                process.send_signal(signal.SIGTERM)
        try:
            status = process.wait()
        finally:
            with self.lock:
                self.running.discard(process)
        if self.event.is_set():
            raise Stopped
        return status


STOP = StopRequest()


def pmod(settings: Settings, log_name: str, *args: str) -> float:
    """One pmod command (one thread), its output appended to ``logs/<log_name>.log``; its wall
    seconds."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    logs = settings.runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{log_name}.log", "a") as log:
        log.write(f"$ pmod {' '.join(args)}\n")
        log.flush()
        command = [*PMOD, *args]
        status = STOP.run(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    if status:
        raise subprocess.CalledProcessError(status, command)
    return time.perf_counter() - start


def pdrop_ratio(settings: Settings) -> float:
    """PyramidDrop's lambda at p-MoD's TFLOPs (paper count, 40 text tokens, the grid's 256 vision
    tokens), from ``pmod flops --match-tflops`` on the grid base."""
    if settings.pdrop_ratio is None:
        from pmod_cli.data.tiny import resolve_tiny_path

        base = resolve_tiny_path("tiny:grid_base")
        output = subprocess.run(
            [*PMOD, "flops", "--config", str(base), "--vision-tokens", "256", "--text-tokens", "40",
             "--method", "pmod,pdrop", "--match-tflops", "--json"],
            check=True, cwd=ROOT, capture_output=True, text=True,
        ).stdout  # fmt: skip
        settings.pdrop_ratio = _pdrop_lambda(json.loads(output))
    return settings.pdrop_ratio


def _pdrop_lambda(report: dict) -> float:
    for plan in report["plans"]:
        if plan.get("method") == "pdrop":
            return float(plan["method_settings"]["ratio"])
    raise RuntimeError("pmod flops gave no pdrop row")


def train_args(unit: Unit, settings: Settings) -> list[str]:
    out = unit.checkpoint(settings)
    save = max(1, unit.steps // CURVE_POINTS)
    args = [
        "sft", RECIPE, "--set", f"train.output_dir={out}", "--set", f"train.seed={unit.seed}",
        "--set", f"train.max_steps={unit.steps}", "--set", f"train.save_steps={save}",
        "--set", "train.save_total_limit=0", "--set", "model.pretrained_connector=",
    ]  # fmt: skip
    if unit.lr is not None:
        args += ["--set", f"train.learning_rate={unit.lr:g}"]
    if unit.model == "dense":
        args += ["--set", "pmod.enabled=false"]
    elif unit.model == "pdrop":
        args += ["--set", f"train.method=pdrop:ratio={pdrop_ratio(settings):.4f}"]
    return args


def evaluate(settings: Settings, unit: Unit, checkpoint: Path, out: Path, *extra: str) -> dict:
    if not out.exists():
        pmod(
            settings, unit.name, "eval", str(checkpoint), "--tasks", TASK, "--device", "cpu",
            "--batch-size", str(settings.batch_size), "--output", str(out), *extra,
            *(["--limit", str(settings.questions)] if settings.questions and "--limit" not in extra else []),
        )  # fmt: skip
    return json.loads(out.read_text())


def column(result: dict) -> dict:
    """One evaluated column as data: its label, efficiency and right (1) / wrong (0) per question."""
    right = correctness(result)
    efficiency = result["efficiency"]
    return {
        "label": result["label"],
        "tflops": efficiency["tflops"],
        "kv_cache_bytes": efficiency["kv_cache_bytes"],
        "prefill_latency_s": efficiency["prefill_latency_s"],
        "questions": len(right),
        "accuracy": 100 * sum(right.values()) / len(right),
        "right": "".join("1" if right[i] else "0" for i in sorted(right)),
    }


# ---- units --------------------------------------------------------------------------------------


def run_train(unit: Unit, settings: Settings) -> dict:
    out = unit.checkpoint(settings)
    started = time.perf_counter()
    train_s = 0.0
    if not (out / "config.json").exists():
        # an interrupted run continues from its last checkpoint
        resume = ["--resume"] if any(out.glob("checkpoint-*")) else []
        train_s = pmod(settings, unit.name, *train_args(unit, settings), *resume)
    evals = out / "evals"
    evals.mkdir(exist_ok=True)
    curve = []
    for checkpoint in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(checkpoint.name.split("-")[1])
        limit = ["--limit", str(settings.curve_questions)]
        result = evaluate(settings, unit, checkpoint, evals / f"curve-{step}.json", *limit)
        curve.append({"step": step, **column(result["checkpoints"][0])})
    final = column(evaluate(settings, unit, out, evals / "final.json")["checkpoints"][0])
    return {
        "unit": unit.name, "model": unit.model, "seed": unit.seed, "steps": unit.steps, "lr": unit.lr,
        "train_method": train_args(unit, settings)[-1] if unit.model == "pdrop" else unit.model,
        "final": final, "curve": curve, "curve_questions": settings.curve_questions,
        "train_seconds": train_s, "unit_seconds": time.perf_counter() - started,
    }  # fmt: skip


def run_free(unit: Unit, settings: Settings) -> dict:
    dense = Unit("train", "dense", unit.seed, unit.steps, unit.lr)
    if not (dense.checkpoint(settings) / "config.json").exists():
        run_unit(dense, settings)
    started = time.perf_counter()
    out = dense.checkpoint(settings) / "evals" / f"{unit.name}.json"
    # a method with a knob is solved to p-MoD's TFLOPs; random takes p-MoD's budget as it is
    matched = ["--match-tflops"] if parse_method(unit.model).knob is not None else []
    result = evaluate(
        settings, unit, dense.checkpoint(settings), out, "--method", f"dense,{unit.model}", *matched
    )
    columns = [column(entry) for entry in result["checkpoints"]]
    return {
        "unit": unit.name, "model": "free", "seed": unit.seed, "steps": unit.steps, "lr": unit.lr,
        "methods": unit.model, "columns": columns, "unit_seconds": time.perf_counter() - started,
    }  # fmt: skip


def run_unit(unit: Unit, settings: Settings) -> None:
    path = unit.result_path(settings)
    if path.exists() or STOP.event.is_set():
        return
    print(f"[{time.strftime('%H:%M:%S')}] {unit.name}: started", flush=True)
    try:
        record = run_train(unit, settings) if unit.kind == "train" else run_free(unit, settings)
    except subprocess.CalledProcessError as err:  # the next units still run; the log says why
        print(
            f"{unit.name}: failed ({err}); see {settings.runs / 'logs' / unit.name}.log", flush=True
        )
        return
    except Stopped:
        print(f"[{time.strftime('%H:%M:%S')}] {unit.name}: stopped", flush=True)
        return
    record["recipe"] = RECIPE
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".part")
    staged.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(staged, path)  # a unit's file is whole or absent
    print(f"[{time.strftime('%H:%M:%S')}] {unit.name}: done", flush=True)


def run_all(settings: Settings, jobs: int) -> None:
    """The units not yet done, until they are or Ctrl-C / SIGTERM stops them (``StopRequest``)."""
    from pmod_cli.data.tiny import resolve_tiny_path

    resolve_tiny_path("tiny:grid/heldout.json")  # built once, before processes share it
    resolve_tiny_path("tiny:grid_base")
    pending = pending_units(settings)
    print(f"{len(pending)} units to run: " + ", ".join(unit.name for unit in pending), flush=True)
    if any(unit.model == "pdrop" for unit in pending):
        print(f"PyramidDrop trains with lambda = {pdrop_ratio(settings):.4f}", flush=True)
    handlers = {signum: signal.signal(signum, STOP) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_units(pending, settings, jobs)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if STOP.event.is_set():
        left = len(pending_units(settings))
        print(
            f"stopped: {left} units left; `seeds.py run` continues (training from its last checkpoint)"
        )


def run_units(pending: list[Unit], settings: Settings, jobs: int) -> None:
    """``pending`` in order, ``jobs`` at a time; a free unit waits for its dense seed's unit."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {}
        for unit in pending:
            if unit.kind == "free":
                dense = Unit("train", "dense", unit.seed, unit.steps, unit.lr)
                if dense in futures:
                    futures[dense].result()
            futures[unit] = pool.submit(run_unit, unit, settings)
        for future in futures.values():
            future.result()


# ---- the report ---------------------------------------------------------------------------------


def load_results(results: Path, lr: float | None = None) -> list[dict]:
    """The result files of the design with learning rate ``lr`` (None: the recipe's)."""
    records = [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]
    return [record for record in records if record.get("lr") == lr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    # the earlier designs (their results kept) failed the convergence check on seed 0: 1500 -> 2250
    # steps moved p-MoD +16.8 and PyramidDrop +10.3 points, 2250 -> 3375 dense +11.2, p-MoD +6.7
    # and PyramidDrop +16.3
    parser.add_argument("--steps", type=int, default=3375, help="SFT steps of a seed (batch 16)")
    parser.add_argument(
        "--long-steps", type=int, default=5063, help="steps of the convergence runs (1.5 x)"
    )
    parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds")
    parser.add_argument(
        "--long-seeds",
        default="0",
        help="seeds also trained for --long-steps (the convergence check)",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the recipe's, 1e-3)"
    )
    parser.add_argument("--curve-questions", type=int, default=600)
    parser.add_argument("--questions", type=int, default=None, help="held-out questions (all 2400)")
    parser.add_argument(
        "--free", default=";".join(TRAINING_FREE), help="training-free methods, ';'-separated"
    )
    parser.add_argument("--jobs", type=int, default=2, help="units run at once (one core each)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "seeds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "seeds_convergence.png")
    parser.add_argument(
        "--docs",
        type=Path,
        nargs="*",
        default=[ROOT / "docs" / "eval.md", ROOT / "README.md"],
        help="files whose <!-- seeds:table --> and <!-- seeds:verdicts --> blocks are rewritten",
    )
    args = parser.parse_args()
    settings = Settings(
        steps=args.steps,
        long_steps=args.long_steps,
        seeds=[int(s) for s in args.seeds.split(",")],
        long_seeds=[int(s) for s in args.long_seeds.split(",") if s],
        curve_questions=args.curve_questions,
        free_methods=[m for m in args.free.split(";") if m],
        runs=args.runs,
        results=args.results,
        questions=args.questions,
        lr=args.lr,
    )
    if args.command == "run":
        run_all(settings, args.jobs)
    else:
        from seeds_report import report

        report(
            load_results(settings.results, settings.lr),
            settings.steps,
            settings.long_steps,
            args.figure,
            args.docs,
        )


if __name__ == "__main__":
    main()
