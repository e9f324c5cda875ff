"""Small-scale check of the paper's claim on the tiny default: same accuracy, far less compute.

Trains the tiny default twice with the same budget (same pretrained connector, data, steps,
seed): once as p-MoD (recipes/tiny.toml, beta 0.5) and once dense (pmod.enabled=false), then
evaluates both with `pmod eval` on the held-out split and prints the verdict:

    p-MoD within 2 points of dense accuracy, at no more than 60 % of its TFLOPs

    .venv/bin/python benchmarks/reproduce_tiny.py --steps 600 --out runs/repro

Every step goes through the `pmod` command line, so this is exactly what a user would type.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PMOD = [sys.executable, "-m", "pmod_cli"]


def run(*args: str) -> float:
    print("$ pmod", " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([*PMOD, *args], check=True)
    return time.perf_counter() - start


def with_fresh_routers(source: Path, target: Path) -> Path:
    """A copy of a trained p-MoD checkpoint whose routers are back at zero: every vision token
    scores the same, so each MoD layer keeps the first floor(V * R_l) of them. Evaluating it
    next to the trained model shows what the routers learned."""
    import torch

    from pmod_cli.model.loading import load_checkpoint
    from pmod_cli.model.router import Router

    model, processor = load_checkpoint(source, device="cpu")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Router):
                for parameter in module.parameters():
                    parameter.zero_()
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def per_category(result: dict) -> dict[str, tuple[int, int]]:
    """(right, total) per question type (colour, shape, count, position) of the held-out split."""
    from pmod_cli.data.tiny import resolve_tiny_path
    from pmod_cli.evaluation.tasks.pmod_tiny_vqa.utils import normalise

    questions = json.loads(resolve_tiny_path("tiny:shapes/heldout.json").read_text())
    counts: dict[str, list[int]] = {}
    for answer in result["answers"]["pmod_tiny_vqa"]:
        category = questions[answer["doc_id"]]["category"]
        right = normalise(str(answer["answer"])) == normalise(str(answer["target"]))
        tally = counts.setdefault(category, [0, 0])
        tally[0] += int(right)
        tally[1] += 1
    return {category: (right, total) for category, (right, total) in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="SFT steps of each model")
    parser.add_argument("--out", type=Path, default=Path("runs/repro"))
    parser.add_argument(
        "--limit", type=int, default=None, help="held-out questions (default: all 300)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument(
        "--fresh-router-control",
        action="store_true",
        help="also evaluate the trained p-MoD model with its routers reset to zero (keeps the first tokens)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for both SFT runs, e.g. train.tune_vision_tower=true (repeatable)",
    )
    args = parser.parse_args()

    pretrain = args.out / "pretrain"
    times = {}
    if not (pretrain / "config.json").exists():
        times["pretrain"] = run(
            "pretrain", "recipes/tiny_pretrain.toml", "--set", f"train.output_dir={pretrain}"
        )
    common = [
        "--set",
        f"model.pretrained_connector={pretrain}",
        "--set",
        f"train.max_steps={args.steps}",
    ]
    for override in args.overrides:
        common += ["--set", override]
    pmod_dir, dense_dir = args.out / f"pmod_beta{args.beta}", args.out / "dense"
    if not (pmod_dir / "config.json").exists():
        times["sft p-MoD"] = run(
            "sft",
            "recipes/tiny.toml",
            *common,
            "--set",
            f"pmod.beta={args.beta}",
            "--set",
            f"train.output_dir={pmod_dir}",
        )
    if not (dense_dir / "config.json").exists():
        times["sft dense"] = run(
            "sft",
            "recipes/tiny.toml",
            *common,
            "--set",
            "pmod.enabled=false",
            "--set",
            f"train.output_dir={dense_dir}",
        )
    checkpoints = [pmod_dir, dense_dir]
    if args.fresh_router_control:
        checkpoints.append(
            with_fresh_routers(pmod_dir, args.out / f"pmod_beta{args.beta}_fresh_routers")
        )
    report_path = args.out / "eval.json"
    limit = ["--limit", str(args.limit)] if args.limit else []
    times["eval"] = run(
        "eval",
        *map(str, checkpoints),
        "--tasks",
        "pmod_tiny_vqa",
        "--batch-size",
        str(args.batch_size),
        "--device",
        "cpu",
        "--output",
        str(report_path),
        *limit,
    )

    report = json.loads(report_path.read_text())
    pmod, dense = report["checkpoints"][:2]
    acc_pmod = pmod["scores"]["pmod_tiny_vqa"]["value"]
    acc_dense = dense["scores"]["pmod_tiny_vqa"]["value"]
    eff_pmod, eff_dense = pmod["efficiency"], dense["efficiency"]
    tflops_ratio = eff_pmod["tflops"] / eff_dense["tflops"]
    v, t = eff_pmod["mean_vision_tokens"], eff_pmod["mean_text_tokens"]
    ratios = pmod["retention_ratios"]
    mean_ratio = sum(ratios) / len(ratios)
    print()
    print(
        f"steps per model: {args.steps}; wall times: "
        + ", ".join(f"{k} {v_:.0f} s" for k, v_ in times.items())
    )
    print(
        f"held-out exact match: p-MoD {acc_pmod:.4f}, dense {acc_dense:.4f}, gap {100 * (acc_dense - acc_pmod):+.1f} points"
    )
    print(
        f"TFLOPs (paper count): p-MoD {eff_pmod['tflops']:.6f}, dense {eff_dense['tflops']:.6f}, ratio {tflops_ratio:.3f}"
    )
    print(f"KV cache vs dense: {eff_pmod['kv_cache_vs_dense']:.3f}")
    print(
        f"prompt: V = {v:.1f} vision tokens, T = {t:.1f} text tokens; mean retention over layers {mean_ratio:.3f}; "
        f"text always passes, so TFLOPs >= about (T + mean R * V) / (T + V) = {(t + mean_ratio * v) / (t + v):.3f}"
    )
    print("held-out exact match per question type:")
    for result in report["checkpoints"]:
        print(
            f"  {result['label']:>16}: "
            + ", ".join(
                f"{category} {right}/{total}"
                for category, (right, total) in per_category(result).items()
            )
        )
    accuracy_ok = acc_dense - acc_pmod <= 0.02
    flops_ok = tflops_ratio <= 0.60
    print(
        f"accuracy within 2 points: {'yes' if accuracy_ok else 'no'}; TFLOPs <= 60 %: {'yes' if flops_ok else 'no'}"
    )


if __name__ == "__main__":
    main()
