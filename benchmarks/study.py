"""The small-scale study: does p-MoD beat training-free token reduction at the same TFLOPs, and stay
close to the dense model? One command, 38 minutes on the 2-core CPU (one thread per process; the
results of two runs, ``--train-seed`` 42 and 7, are in README.md and docs/eval.md):

    .venv/bin/python benchmarks/study.py --out runs/study

1. the grid set (``pmod_cli/data/grid.py``): 224 px images of 256 vision tokens, ChatML questions
   of at most 40 text tokens that need the image (LLaVA-1.5's 576 against 58, scaled down), the
   first question before the image, and the grid base: a fixed patch encoder that reports each
   cell's colours, a random 6-layer Llama;
2. ``pmod sft`` twice with the same budget (same fresh connector, data, steps, seed, learning
   rates): p-MoD (beta 0.5) and dense. No connector pretrain by default: pretrain trains the
   connector against the frozen language model, and a random language model gives it nothing to
   align to (caption loss 6.47 -> 5.70 in 100 steps, then flat); ``--pretrain-steps N`` runs it;
3. ``pmod eval`` on the held-out questions: dense, p-MoD, p-MoD with its routers reset to zero,
   and on the dense model FastV (K = 2), random (p-MoD's budget) and pool, FastV's R and pool's N
   solved (``--match-tflops``) to cost what p-MoD costs;
4. the table: TFLOPs and KV cache against dense, prefill latency against dense, accuracy with its
   95 % interval, and each method's paired difference to dense and to p-MoD with a paired
   bootstrap 95 % interval and McNemar's exact p.

Every step goes through the ``pmod`` command line; stages already done in ``--out`` are reused
(delete the directory to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PMOD = [sys.executable, "-m", "pmod_cli"]
TASK = "pmod_grid_vqa"
BOOTSTRAP_SAMPLES = 10_000


def run(*args: str) -> dict[str, float]:
    """Run one pmod command; its wall time and the CPU time it used (on a busy machine the wall
    time grows with the load, the CPU time much less)."""
    print("$ pmod", " ".join(args), flush=True)
    start, cpu_start = time.perf_counter(), _children_cpu()
    subprocess.run([*PMOD, *args], check=True)
    return {"wall_s": time.perf_counter() - start, "cpu_s": _children_cpu() - cpu_start}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def with_reset_routers(source: Path, target: Path) -> Path:
    """A copy of a p-MoD checkpoint whose routers are back at zero: every vision token scores the
    same, so each MoD layer keeps the first floor(V * R_l) of them and weighs every token 1."""
    import torch

    from pmod_cli.model.loading import load_checkpoint
    from pmod_cli.model.router import Router

    if (target / "config.json").exists():
        return target
    model, processor = load_checkpoint(source, device="cpu")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Router):
                for parameter in module.parameters():
                    parameter.zero_()
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


# ---- statistics -------------------------------------------------------------------------------


def correctness(result: dict) -> dict[int, bool]:
    """doc id -> answered right, for one evaluated column."""
    from pmod_cli.evaluation.tasks.pmod_tiny_vqa.utils import normalise

    return {
        row["doc_id"]: normalise(str(row["answer"])) == normalise(str(row["target"]))
        for row in result["answers"][TASK]
    }


def bootstrap_interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` over resampled question sets."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(BOOTSTRAP_SAMPLES, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def mcnemar_p(right_a: list[bool], right_b: list[bool]) -> float:
    """Exact two-sided McNemar p-value: of the questions exactly one of the two got right, is
    the split between them further from even than chance allows?"""
    only_a = sum(a and not b for a, b in zip(right_a, right_b, strict=True))
    only_b = sum(b and not a for a, b in zip(right_a, right_b, strict=True))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(right: dict[int, bool], reference: dict[int, bool]) -> dict:
    """Accuracy difference (points) to ``reference`` on the same questions, with its 95 % interval."""
    ids = sorted(right)
    a, b = [right[i] for i in ids], [reference[i] for i in ids]
    differences = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    low, high = bootstrap_interval(differences, seed=1)
    return {
        "difference": 100 * sum(differences) / len(ids),
        "interval": (100 * low, 100 * high),
        "mcnemar_p": mcnemar_p(a, b),
        "discordant": sum(x != y for x, y in zip(a, b, strict=True)),
    }


# ---- the table --------------------------------------------------------------------------------


def rows_of(reports: list[dict]) -> list[dict]:
    """One row per evaluated column: method name, label, efficiency and per-question correctness."""
    rows = []
    for report in reports:
        for result in report["checkpoints"]:
            rows.append({"label": result["label"], "result": result, "right": correctness(result)})
    return rows


def summarize(rows: list[dict], names: dict[str, str]) -> list[dict]:
    by_name = {names[row["label"]]: row for row in rows}
    dense, pmod = by_name["dense"], by_name["p-MoD"]
    dense_eff = dense["result"]["efficiency"]
    table = []
    for name, row in by_name.items():
        efficiency = row["result"]["efficiency"]
        right = [float(value) for value in row["right"].values()]
        low, high = bootstrap_interval(right)
        table.append(
            {
                "method": name,
                "label": row["label"],
                "tflops_vs_dense": efficiency["tflops"] / dense_eff["tflops"],
                "tflops_vs_pmod": efficiency["tflops"] / pmod["result"]["efficiency"]["tflops"],
                "kv_vs_dense": efficiency["kv_cache_bytes"] / dense_eff["kv_cache_bytes"],
                "prefill_vs_dense": efficiency["prefill_latency_s"]
                / dense_eff["prefill_latency_s"],
                "accuracy": 100 * sum(right) / len(right),
                "accuracy_interval": (100 * low, 100 * high),
                "questions": len(right),
                "vs_dense": paired(row["right"], dense["right"]),
                "vs_pmod": paired(row["right"], pmod["right"]),
                "per_category": per_category(row["right"]),
                "right_ids": sorted(row["right"]),
            }
        )
    return table


def per_category(right: dict[int, bool]) -> dict[str, tuple[int, int]]:
    from pmod_cli.data.tiny import resolve_tiny_path

    questions = json.loads(resolve_tiny_path("tiny:grid/heldout.json").read_text())
    tally: dict[str, list[int]] = {}
    for doc_id, correct in right.items():
        counts = tally.setdefault(questions[doc_id]["category"], [0, 0])
        counts[0] += int(correct)
        counts[1] += 1
    return {category: (a, b) for category, (a, b) in sorted(tally.items())}


def text_only_ceiling(doc_ids: list[int]) -> dict[str, tuple[int, int]]:
    """Per kind of question, how many of these questions its most frequent answer gets right:
    the best a model that ignores the image can do (each kind's text is the same up to the
    colour or kind it names)."""
    from collections import Counter

    from pmod_cli.data.tiny import resolve_tiny_path

    questions = json.loads(resolve_tiny_path("tiny:grid/heldout.json").read_text())
    answers: dict[str, Counter] = {}
    for doc_id in doc_ids:
        answers.setdefault(questions[doc_id]["category"], Counter())[
            questions[doc_id]["answer"]
        ] += 1
    return {
        category: (counts.most_common(1)[0][1], sum(counts.values()))
        for category, counts in sorted(answers.items())
    }


def format_difference(entry: dict) -> str:
    low, high = entry["interval"]
    return f"{entry['difference']:+5.1f} [{low:+5.1f}, {high:+5.1f}] p={entry['mcnemar_p']:.2g}"


def row_name(entry: dict) -> str:
    """The method, with the setting a baseline ran at ('FastV K=2 R=0.6758')."""
    label = entry["label"]
    setting = label.split(": ", 1)[1] if ": " in label else ""
    return (
        setting if entry["method"] in ("FastV", "random", "pool") and setting else entry["method"]
    )


def print_table(table: list[dict]) -> None:
    header = (
        f"{'method':<28} {'TFLOPs':>7} {'KV':>6} {'prefill':>8} {'accuracy [95% CI]':>22} "
        f"{'vs dense [95% CI]':>30} {'vs p-MoD [95% CI]':>30}"
    )
    print(header)
    print("-" * len(header))
    for entry in table:
        low, high = entry["accuracy_interval"]
        vs_pmod = "" if entry["method"] == "p-MoD" else format_difference(entry["vs_pmod"])
        vs_dense = "" if entry["method"] == "dense" else format_difference(entry["vs_dense"])
        print(
            f"{row_name(entry):<28} {entry['tflops_vs_dense']:>7.1%} {entry['kv_vs_dense']:>6.1%} "
            f"{entry['prefill_vs_dense']:>7.2f}x {entry['accuracy']:>6.1f} [{low:4.1f}, {high:4.1f}]  "
            f"{vs_dense:>30} {vs_pmod:>30}"
        )
    matched = [e for e in table if e["method"] in ("FastV", "random", "pool")]
    print(
        "\nTFLOPs against p-MoD's: "
        + ", ".join(f"{e['method']} {e['tflops_vs_pmod'] - 1:+.1%}" for e in matched)
    )
    print("\nper question type (right / asked):")
    ceiling = text_only_ceiling(sorted(table[0]["right_ids"]))
    cells = ", ".join(f"{category} {a}/{b}" for category, (a, b) in ceiling.items())
    total = sum(a for a, _ in ceiling.values()) / sum(b for _, b in ceiling.values())
    print(f"  {'most frequent answer':<22} {cells} ({100 * total:.1f} %: the text alone)")
    for entry in table:
        cells = ", ".join(
            f"{category} {a}/{b}" for category, (a, b) in entry["per_category"].items()
        )
        print(f"  {entry['method']:<22} {cells}")


# ---- the run ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument(
        "--steps", type=int, default=1500, help="SFT steps of each model (batch 16)"
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="connector pretrain steps (batch 16) before both SFT runs; 0: a fresh connector",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="held-out questions (default: all 2400)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    parser.add_argument(
        "--fastv-layer", type=int, default=2, help="FastV's K (p-MoD's first MoD layer at beta 0.5)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the random baseline's draw")
    parser.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="seed of both SFT runs (fresh connector, routers, data order); default: the recipe's",
    )
    return parser.parse_args()


def train(args: argparse.Namespace, times: dict) -> tuple[Path, Path]:
    """The connector pretrain (unless --pretrain-steps 0), then p-MoD and dense with one budget."""
    out = args.out
    pretrain, pmod_dir, dense_dir = out / "pretrain", out / "pmod", out / "dense"
    connector = ""  # a fresh connector, the same for both (seeded by train.seed)
    if args.pretrain_steps > 0:
        connector = str(pretrain)
        if not (pretrain / "config.json").exists():
            times["pretrain"] = run(
                "pretrain", "recipes/grid_pretrain.toml", "--set", f"train.output_dir={pretrain}",
                "--set", f"train.max_steps={args.pretrain_steps}", "--set", f"train.save_steps={args.pretrain_steps}",
            )  # fmt: skip
    common = [
        "--set", f"model.pretrained_connector={connector}", "--set", f"train.max_steps={args.steps}",
        "--set", f"train.save_steps={args.steps}",
    ]  # fmt: skip
    if args.train_seed is not None:
        common += ["--set", f"train.seed={args.train_seed}"]
    if not (pmod_dir / "config.json").exists():
        times["sft p-MoD"] = run(
            "sft", "recipes/grid.toml", *common, "--set", f"train.output_dir={pmod_dir}"
        )
    if not (dense_dir / "config.json").exists():
        dense = ["--set", "pmod.enabled=false", "--set", f"train.output_dir={dense_dir}"]
        times["sft dense"] = run("sft", "recipes/grid.toml", *common, *dense)
    return pmod_dir, dense_dir


def evaluate(args: argparse.Namespace, pmod_dir: Path, dense_dir: Path, times: dict) -> list[dict]:
    out = args.out
    reset_dir = with_reset_routers(pmod_dir, out / "pmod_reset_routers")
    limit = ["--limit", str(args.limit)] if args.limit else []
    common = ["--tasks", TASK, "--batch-size", str(args.batch_size), "--device", "cpu", *limit]
    reports = []
    for name, arguments in (
        ("eval_pmod.json", [str(pmod_dir), str(reset_dir)]),
        (
            "eval_dense.json",
            [
                str(dense_dir), "--method", f"dense,fastv:layer={args.fastv_layer},random:seed={args.seed},pool",
                "--match-tflops",
            ],
        ),
    ):  # fmt: skip
        path = out / name
        if not path.exists():
            times[f"eval {name}"] = run("eval", *arguments, *common, "--output", str(path))
        reports.append(json.loads(path.read_text()))
    return reports


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # one thread per pmod process, as measured: with both cores shared, two threads per process
    # made an SFT step 5x slower (4.5 s against 0.8 s)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started, load_before = time.perf_counter(), os.getloadavg()
    times: dict[str, dict[str, float]] = {}
    from pmod_cli.data.tiny import resolve_tiny_path

    start, cpu_start = time.perf_counter(), time.process_time()
    resolve_tiny_path(
        "tiny:grid/heldout.json"
    )  # images and questions, built once in the pmod cache
    resolve_tiny_path("tiny:grid_base")
    times["data and base"] = {
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,
    }
    pmod_dir, dense_dir = train(args, times)
    reports = evaluate(args, pmod_dir, dense_dir, times)

    rows = rows_of(reports)
    names = {
        rows[0]["label"]: "p-MoD",
        rows[1]["label"]: "p-MoD, routers reset",
        rows[2]["label"]: "dense",
        rows[3]["label"]: "FastV",
        rows[4]["label"]: "random",
        rows[5]["label"]: "pool",
    }
    table = summarize(rows, names)
    order = ["dense", "p-MoD", "p-MoD, routers reset", "FastV", "random", "pool"]
    table.sort(key=lambda entry: order.index(entry["method"]))
    total = time.perf_counter() - started
    load_after = os.getloadavg()
    summary = {
        "table": table,
        "wall_seconds": times,
        "total_seconds": total,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "steps": args.steps,
        "pretrain_steps": args.pretrain_steps,
        "train_seed": args.train_seed,
    }
    (args.out / "study.json").write_text(json.dumps(summary, indent=1))
    print()
    print(
        f"held-out questions: {table[0]['questions']}; SFT steps per model: {args.steps} (batch 16)"
    )
    print(
        "TFLOPs, KV: paper count and KV cache held after prefill, against dense; prefill: measured latency "
        "against dense; intervals: 95 %, paired bootstrap over questions; p: McNemar exact"
    )
    print_table(table)
    print(
        "\nwall (CPU) minutes: "
        + ", ".join(
            f"{stage} {t['wall_s'] / 60:.1f} ({t['cpu_s'] / 60:.1f})" for stage, t in times.items()
        )
        + f"; total wall {total / 60:.1f} min on {os.cpu_count()} cores; load average (1, 5, 15 min) before "
        + ", ".join(f"{x:.1f}" for x in load_before)
        + ", after "
        + ", ".join(f"{x:.1f}" for x in load_after)
    )


if __name__ == "__main__":
    main()
