"""The seeds study's table and figure, drawn from ``benchmarks/results/seeds/*.json`` alone (written by
``benchmarks/seeds.py run``):

    .venv/bin/python benchmarks/seeds.py report

Per model: TFLOPs and KV cache against dense (paper count, on the evaluated prompts), mean held-out
accuracy with a 95 % t interval over training seeds, the difference to dense paired by seed with
its 95 % t interval, and per seed the exact McNemar p of that difference over the questions. The
training-free methods run on each dense seed, so their differences are paired with the same seed's
dense model. The convergence check compares each longer run with its seed's run and the spread
between seeds; the figure draws held-out accuracy against steps."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from study import mcnemar_p

TRAINED = {"dense": "dense", "pmod": "p-MoD (beta 0.5)", "pdrop": "trained PyramidDrop"}
NEAR_DENSE = 1.0  # points: the paper's "within about a point of dense"


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % t interval of the mean over ``values`` (NaN bounds for one)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def columns_by_seed(records: list[dict], steps: int) -> dict[str, dict[int, dict]]:
    """Row name -> seed -> evaluated column (label, efficiency, per-question right/wrong)."""
    rows: dict[str, dict[int, dict]] = {}
    for record in records:
        if record["steps"] != steps:
            continue
        if record["model"] in TRAINED:
            rows.setdefault(TRAINED[record["model"]], {})[record["seed"]] = record["final"]
        else:  # training-free: the method's column (the dense one is the seed's dense again)
            column = record["columns"][-1]
            rows.setdefault(_free_name(record["methods"]), {})[record["seed"]] = column
    return rows


def _free_name(spec: str) -> str:
    """A training-free method's row: its name and fixed options (the solved knob varies by seed)."""
    name, _, options = spec.partition(":")
    shown = {"fastv": "FastV", "random": "random", "sparsevlm": "SparseVLM", "dart": "DART"}
    setting = f" {options.replace('layer=', 'K=')}" if options else ""
    return f"{shown.get(name, name)}{setting} (training-free)"


def table(rows: dict[str, dict[int, dict]]) -> list[dict]:
    dense = rows.get(TRAINED["dense"], {})
    out = []
    for name, seeds in rows.items():
        paired = sorted(set(seeds) & set(dense))
        accuracy = [seeds[s]["accuracy"] for s in sorted(seeds)]
        difference = [seeds[s]["accuracy"] - dense[s]["accuracy"] for s in paired]
        out.append(
            {
                "name": name,
                "seeds": sorted(seeds),
                "by_seed": {s: seeds[s]["accuracy"] for s in sorted(seeds)},
                "tflops": _mean_share(seeds, dense, paired, "tflops"),
                "kv": _mean_share(seeds, dense, paired, "kv_cache_bytes"),
                "accuracy": t_interval(accuracy),
                "difference": t_interval(difference) if difference else None,
                "mcnemar": [
                    mcnemar_p(_right(seeds[s]), _right(dense[s])) for s in paired if name != "dense"
                ],
            }
        )
    return out


def _mean_share(seeds: dict, dense: dict, paired: list[int], key: str) -> float:
    return statistics.fmean(seeds[s][key] / dense[s][key] for s in paired) if paired else math.nan


def _right(column: dict) -> list[bool]:
    return [flag == "1" for flag in column["right"]]


def convergence(records: list[dict], steps: int, long_steps: int) -> list[dict]:
    """Per model and long seed: accuracy at ``steps`` and at ``long_steps``, and the spread (SD)
    of the model's accuracy over its seeds at ``steps``."""
    final = {
        (r["model"], r["seed"], r["steps"]): r["final"]["accuracy"]
        for r in records
        if r["model"] in TRAINED
    }
    out = []
    for (model, seed, trained), accuracy in sorted(final.items()):
        if trained != long_steps or (model, seed, steps) not in final:
            continue
        spread = [a for (m, _, s), a in final.items() if m == model and s == steps]
        out.append(
            {
                "model": TRAINED[model],
                "seed": seed,
                "at_steps": final[(model, seed, steps)],
                "at_long_steps": accuracy,
                "seed_sd": statistics.stdev(spread) if len(spread) > 1 else math.nan,
            }
        )
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """One sentence per claim, from the intervals over seeds."""
    by_name = {row["name"]: row for row in rows}
    pmod = by_name.get(TRAINED["pmod"])
    lines = []
    if pmod and pmod["difference"]:
        _, low, high = pmod["difference"]
        if math.isnan(low):
            verdict = "not settled (one seed)"
        elif low >= -NEAR_DENSE:
            verdict = "supported: the whole interval is above -1 point"
        elif high < -NEAR_DENSE:
            verdict = "not supported: the whole interval is below -1 point"
        else:
            verdict = "not settled: the interval reaches below -1 point"
        interval = _interval(low, high, signed=True)
        lines.append(
            f"p-MoD within about a point of dense: {verdict} ({pmod['difference'][0]:+.1f} {interval})."
        )
    for row in rows:  # p-MoD against trained PyramidDrop and each training-free method
        compared = "training-free" in row["name"] or row["name"] == TRAINED["pdrop"]
        if compared and row["difference"] and pmod:
            lines.append(_beats(pmod, row))
    return lines


def _beats(pmod: dict, row: dict) -> str:
    """p-MoD on seed s against the method on dense seed s: the mean difference with its t
    interval over the seeds both have."""
    common = sorted(set(pmod["by_seed"]) & set(row["by_seed"]))
    mean, low, high = t_interval([pmod["by_seed"][s] - row["by_seed"][s] for s in common])
    name = row["name"].split(" (")[0]
    if math.isnan(low):
        verdict = "not settled (one seed)"
    elif low > 0:
        verdict = "supported: the whole interval is above 0"
    elif high < 0:
        verdict = "not supported: the method is above p-MoD"
    else:
        verdict = "not settled: the interval holds 0"
    if math.isnan(low):
        return f"p-MoD above {name} at equal TFLOPs: {verdict} ({mean:+.1f} points on one seed)."
    return (
        f"p-MoD above {name} at equal TFLOPs: {verdict} ({mean:+.1f} "
        f"{_interval(low, high, signed=True)} points over {len(common)} seeds)."
    )


def table_lines(rows: list[dict], steps: int, lr: float | None = None) -> list[str]:
    """The table in Markdown, after one line that says what it holds (``lr``: a learning rate
    other than the recipe's)."""
    rate = "" if lr is None else f", learning rate {lr:g}"
    lines = [
        f"SFT steps per seed: {steps} (batch 16{rate}); 95 % t intervals over training seeds",
        "",
        "| model | TFLOPs vs dense | KV cache vs dense | accuracy [95 %] | vs dense, paired by seed "
        "[95 %] | seeds | McNemar p per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mean, low, high = row["accuracy"]
        difference = ""
        if row["difference"] and row["name"] != TRAINED["dense"]:
            d, dl, dh = row["difference"]
            difference = f"{d:+.1f} {_interval(dl, dh, signed=True)}"
        p = ", ".join(f"{value:.2g}" for value in row["mcnemar"])
        lines.append(
            f"| {row['name']} | {row['tflops']:.1%} | {row['kv']:.1%} | {mean:.1f} "
            f"{_interval(low, high)} | {difference} | {len(row['seeds'])} | {p} |"
        )
    return lines


def run_lengths(records: list[dict], long_steps: int) -> list[tuple[int, int]]:
    """Each pair of successive run lengths of the trained models up to ``long_steps`` (1500 and
    2250, 2250 and 3375, ...): the convergence checks of this design and of the earlier ones."""
    lengths = sorted(
        {r["steps"] for r in records if r["model"] in TRAINED and r["steps"] <= long_steps}
    )
    return list(zip(lengths, lengths[1:], strict=False))


def convergence_lines(records: list[dict], steps: int, long_steps: int) -> list[str]:
    lines = []
    for entry in convergence(records, steps, long_steps):
        change = entry["at_long_steps"] - entry["at_steps"]
        if math.isnan(entry["seed_sd"]):
            spread, verdict = "one seed", "not settled (no spread yet)"
        else:
            spread = f"{entry['seed_sd']:.1f}"
            verdict = "converged" if abs(change) < entry["seed_sd"] else "NOT converged"
        lines.append(
            f"convergence, {entry['model']} seed {entry['seed']}: {entry['at_steps']:.1f} at {steps} "
            f"steps, {entry['at_long_steps']:.1f} at {long_steps} ({change:+.1f}); SD over seeds at "
            f"{steps}: {spread}: {verdict}"
        )
    return lines or [f"convergence: no {long_steps}-step run yet"]


def _interval(low: float, high: float, signed: bool = False) -> str:
    """'[low, high]', or '[one seed]' where there is no interval yet. An accuracy lies in [0, 100]
    and a difference of two (``signed``) in [-100, 100]: a t interval over two or three seeds can
    reach past either, so it is clipped there."""
    if math.isnan(low):
        return "[one seed]"
    if signed:
        return f"[{max(low, -100.0):+.1f}, {min(high, 100.0):+.1f}]"
    return f"[{max(low, 0.0):.1f}, {min(high, 100.0):.1f}]"


def curves(records: list[dict], steps: int, long_steps: int) -> list[tuple]:
    """(model, line style, steps, accuracies) of each trained run of this design: ``steps`` solid,
    ``long_steps`` dashed; runs of other lengths (an earlier design) are left out."""
    style = {steps: "-", long_steps: "--"}
    return [
        (
            record["model"],
            style[record["steps"]],
            [point["step"] for point in record["curve"]],
            [point["accuracy"] for point in record["curve"]],
        )
        for record in records
        if record["model"] in TRAINED and record.get("curve") and record["steps"] in style
    ]


def draw_curves(records: list[dict], steps: int, long_steps: int, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {"dense": "tab:gray", "pmod": "tab:blue", "pdrop": "tab:orange"}
    for model, style, xs, ys in curves(records, steps, long_steps):
        ax.plot(xs, ys, style, color=colours[model], alpha=0.6, linewidth=1.2)
    for model, colour in colours.items():
        ax.plot([], [], color=colour, label=TRAINED[model])
    ax.plot([], [], "--", color="black", label=f"{long_steps} steps (convergence check)")
    ax.set_xlabel("SFT steps (batch 16)")
    ax.set_ylabel("held-out accuracy, first questions (%)")
    ax.set_title(f"Grid study: one line per training seed ({steps}-step runs solid)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")


def report(
    records: list[dict], steps: int, long_steps: int, figure: Path, docs: list[Path] = ()
) -> None:
    """Print the table, the convergence check and the verdicts, draw the figure, and write the
    same between the ``<!-- seeds:... -->`` markers of each file in ``docs``."""
    rows = table(columns_by_seed(records, steps))
    order = list(TRAINED.values())
    rows.sort(
        key=lambda row: (
            order.index(row["name"]) if row["name"] in order else len(order),
            row["name"],
        )
    )
    checks = [
        line
        for shorter, longer in run_lengths(records, long_steps)
        for line in convergence_lines(records, shorter, longer)
    ]
    if (steps, long_steps) not in run_lengths(records, long_steps):
        checks += convergence_lines(records, steps, long_steps)
    blocks = {
        "table": table_lines(rows, steps, next((r["lr"] for r in records if r.get("lr")), None)),
        "verdicts": [f"- {line}" for line in checks + verdicts(rows)],
    }
    print("\n".join(blocks["table"] + [""] + blocks["verdicts"]))
    draw_curves(records, steps, long_steps, figure)
    for path in docs:
        write_blocks(path, blocks)


def write_blocks(path: Path, blocks: dict[str, list[str]]) -> None:
    """Replace what stands between ``<!-- seeds:NAME -->`` and ``<!-- /seeds:NAME -->``."""
    text = path.read_text()
    for name, lines in blocks.items():
        start, end = f"<!-- seeds:{name} -->", f"<!-- /seeds:{name} -->"
        if start not in text or end not in text:
            raise SystemExit(f"error: {path} has no {start} ... {end} block")
        head, rest = text.split(start, 1)
        text = head + start + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1]
    path.write_text(text)
    print(f"updated: {path}")
