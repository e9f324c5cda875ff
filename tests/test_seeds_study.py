"""The seeds study (benchmarks/seeds.py, seeds_report.py): which runs are left, and the statistics
and verdicts its report draws from result files."""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import seeds
        import seeds_report

        yield seeds, seeds_report
    finally:
        sys.path.remove(str(BENCHMARKS))


def settings(seeds, tmp_path, seed_list=(0, 1, 2)):
    return seeds.Settings(
        steps=1500, long_steps=2250, seeds=list(seed_list), long_seeds=[0], curve_questions=600,
        free_methods=["fastv:layer=2", "random"], runs=tmp_path / "runs", results=tmp_path / "results",
    )  # fmt: skip


def test_a_rerun_skips_finished_units_and_keeps_the_order(scripts, tmp_path):
    seeds, _ = scripts
    plan = settings(seeds, tmp_path)
    names = [unit.name for unit in seeds.pending_units(plan)]
    assert names[:5] == ["dense-s0-1500", "pmod-s0-1500", "pdrop-s0-1500", "free-fastv-s0-1500", "free-random-s0-1500"]  # fmt: skip
    # the convergence runs come right after the first seed, before the second
    assert names.index("dense-s0-2250") == names.index("free-random-s0-1500") + 1
    assert names.index("pdrop-s0-2250") + 1 == names.index("dense-s1-1500")
    assert len(names) == len(set(names)) == 3 * 5 + 3
    plan.results.mkdir()
    (plan.results / "pmod-s0-1500.json").write_text("{}")
    (plan.results / "free-fastv-s1-1500.json").write_text("{}")
    left = [unit.name for unit in seeds.pending_units(plan)]
    assert left == [name for name in names if name not in ("pmod-s0-1500", "free-fastv-s1-1500")]


def test_a_design_at_another_learning_rate_keeps_its_own_units_and_results(scripts, tmp_path):
    seeds, _ = scripts
    plan = settings(seeds, tmp_path, seed_list=(1,))
    plan.lr = 2e-3
    units = seeds.pending_units(plan)
    assert [unit.name for unit in units[:4]] == ["dense-s1-1500-lr0.002", "pmod-s1-1500-lr0.002", "pdrop-s1-1500-lr0.002", "free-fastv-s1-1500-lr0.002"]  # fmt: skip
    assert units[0].checkpoint(plan) == plan.runs / "dense-s1-1500-lr0.002"
    args = seeds.train_args(units[1], plan)
    assert args[args.index("train.learning_rate=0.002") - 1] == "--set"
    assert not any(
        "learning_rate" in arg
        for arg in seeds.train_args(seeds.Unit("train", "pmod", 1, 1500), plan)
    )
    plan.results.mkdir()
    (plan.results / "dense-s1-1500.json").write_text('{"unit": "dense-s1-1500"}')
    (plan.results / "dense-s1-1500-lr0.002.json").write_text(
        '{"unit": "dense-s1-1500-lr0.002", "lr": 0.002}'
    )
    assert "dense-s1-1500-lr0.002" not in [u.name for u in seeds.pending_units(plan)]
    assert [r["unit"] for r in seeds.load_results(plan.results, 0.002)] == ["dense-s1-1500-lr0.002"]
    assert [r["unit"] for r in seeds.load_results(plan.results)] == ["dense-s1-1500"]
    _, report = scripts
    assert report.table_lines([], 1500, 0.002)[0].startswith(
        "SFT steps per seed: 1500 (batch 16, learning rate 0.002);"
    )


# stands in for pmod: a command that runs until SIGTERM, which it answers as pmod sft does (exit 143)
LONG_COMMAND = """
import os, pathlib, signal, sys, time
marks = pathlib.Path(os.environ["SEEDS_TEST_MARKS"])
def stop(*_):
    (marks / "terminated").write_text(sys.argv[1])
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(marks / "started").write_text(sys.argv[1])
time.sleep(60)
sys.exit(1)
"""


def test_a_stop_ends_the_unit_under_way_and_starts_no_other(scripts, tmp_path, monkeypatch):
    seeds, _ = scripts
    marks = tmp_path / "marks"
    marks.mkdir()
    command = tmp_path / "long_command.py"
    command.write_text(LONG_COMMAND)
    monkeypatch.setenv("SEEDS_TEST_MARKS", str(marks))
    monkeypatch.setattr(seeds, "PMOD", [sys.executable, str(command)])
    monkeypatch.setattr(seeds, "STOP", seeds.StopRequest())
    plan = settings(seeds, tmp_path, seed_list=(0,))
    units = seeds.pending_units(plan)[:2]  # dense-s0, pmod-s0

    def stop_once_started():
        deadline = time.monotonic() + 30
        while not (marks / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        seeds.STOP()  # what Ctrl-C or SIGTERM calls

    threading.Thread(target=stop_once_started, daemon=True).start()
    started = time.monotonic()
    seeds.run_units(units, plan, jobs=1)
    assert time.monotonic() - started < 30  # did not wait out the command's 60 s
    assert (marks / "terminated").read_text() == "sft"  # the training command got SIGTERM
    assert not plan.results.exists()  # no result file for the unit cut short
    logs = sorted(path.name for path in (plan.runs / "logs").iterdir())
    assert logs == ["dense-s0-1500.log"]  # p-MoD's unit never started


def column(accuracy: float, questions: int, rng: random.Random, tflops=1.0, kv=1.0, label="x"):
    right = ["1"] * round(accuracy * questions / 100) + ["0"] * (
        questions - round(accuracy * questions / 100)
    )
    rng.shuffle(right)
    return {"label": label, "tflops": tflops, "kv_cache_bytes": kv, "prefill_latency_s": 1.0,
            "questions": questions, "accuracy": 100 * right.count("1") / questions, "right": "".join(right)}  # fmt: skip


def records(rng: random.Random) -> list[dict]:
    """Three seeds: p-MoD 3 points below dense in each, FastV 20 below, a long dense run."""
    out = []
    for seed, dense in enumerate((60.0, 70.0, 65.0)):
        curve = [
            {"step": 750, **column(dense - 10, 100, rng)},
            {"step": 1500, **column(dense, 100, rng)},
        ]
        for model, offset, tflops in (("dense", 0, 1.0), ("pmod", -3, 0.64)):
            final = column(dense + offset, 400, rng, tflops, tflops)
            out.append(
                {"model": model, "seed": seed, "steps": 1500, "final": final, "curve": curve}
            )
        # the solved setting differs by seed; the row is the method's
        fastv = column(dense - 20, 400, rng, 0.64, 0.6, f"dense-s{seed}: FastV K=2 R=0.6{seed}")
        out.append(
            {
                "model": "free",
                "seed": seed,
                "steps": 1500,
                "methods": "fastv:layer=2",
                "columns": [column(dense, 400, rng), fastv],
            }
        )
    out.append(
        {"model": "dense", "seed": 0, "steps": 2250, "final": column(61.0, 400, rng), "curve": []}
    )
    return out


def test_the_report_pairs_by_seed_with_t_intervals_and_states_each_claim(scripts, tmp_path, capsys):
    stats = pytest.importorskip("scipy.stats")
    _, report = scripts
    data = records(random.Random(0))
    rows = {row["name"]: row for row in report.table(report.columns_by_seed(data, 1500))}
    pmod, fastv = rows["p-MoD (beta 0.5)"], rows["FastV K=2 (training-free)"]
    assert pmod["seeds"] == [0, 1, 2] and pmod["tflops"] == pytest.approx(0.64)
    assert fastv["kv"] == pytest.approx(0.6)
    # the 95 % t interval over seeds, as scipy computes it
    low, high = stats.t.interval(0.95, 2, loc=62.0, scale=stats.sem([57.0, 67.0, 62.0]))
    assert pmod["accuracy"] == pytest.approx((62.0, low, high))
    # paired by seed: p-MoD is 3 points below its seed's dense model every time (no spread)
    assert pmod["difference"] == pytest.approx((-3.0, -3.0, -3.0))
    lines = report.verdicts(list(rows.values()))
    assert lines[0].startswith("p-MoD within about a point of dense: not supported")
    assert lines[1].startswith(
        "p-MoD above FastV K=2 at equal TFLOPs: supported: the whole interval is above 0 (+17.0"
    )
    # the figure draws this design's runs only: 1500 solid, 2250 dashed, not a 3375-step run
    data.append({**data[0], "steps": 3375})
    drawn = [(model, style, xs) for model, style, xs, _ in report.curves(data, 1500, 2250)]
    assert drawn[:2] == [("dense", "-", [750, 1500]), ("pmod", "-", [750, 1500])]
    assert len(drawn) == 6 and all(style == "-" for _, style, _ in drawn)  # the 2250 run: no curve
    data[-1]["steps"] = 2250
    assert report.curves(data, 1500, 2250)[-1][:2] == ("dense", "--")
    data.pop()
    figure = tmp_path / "curves.png"
    page = tmp_path / "page.md"
    page.write_text(
        "intro\n<!-- seeds:table -->\nold\n<!-- /seeds:table -->\nmiddle\n"
        "<!-- seeds:verdicts -->\n<!-- /seeds:verdicts -->\nend\n"
    )
    report.report(data, 1500, 2250, figure, [page])
    out = capsys.readouterr().out
    assert (
        "convergence, dense seed 0: 60.0 at 1500 steps, 61.0 at 2250 (+1.0); SD over seeds at 1500: 5.0: converged"
        in out
    )
    assert figure.stat().st_size > 0
    written = page.read_text()  # the same table and verdicts, between the markers only
    assert (
        written.startswith("intro\n<!-- seeds:table -->\nSFT steps per seed: 1500")
        and "old" not in written
    )
    assert "| p-MoD (beta 0.5) | 64.0% | 64.0% | 62.0 [" in written
    assert "\nmiddle\n<!-- seeds:verdicts -->\n- convergence, dense seed 0" in written
    assert written.endswith("<!-- /seeds:verdicts -->\nend\n")


def test_a_claim_whose_interval_holds_the_margin_is_not_settled(scripts):
    _, report = scripts
    rows = [{"name": "p-MoD (beta 0.5)", "difference": (-0.5, -3.0, 2.0), "by_seed": {}}]
    assert "not settled" in report.verdicts(rows)[0]
    rows[0]["difference"] = (0.2, -0.8, 1.2)
    assert "supported" in report.verdicts(rows)[0] and "not" not in report.verdicts(rows)[0]


def test_p_mod_against_a_method_names_its_interval_or_its_one_seed(scripts):
    _, report = scripts
    pmod = {"name": "p-MoD (beta 0.5)", "difference": (1.0, 0.5, 1.5), "by_seed": {0: 90.0}}
    free = {"name": "FastV K=2 (training-free)", "difference": (-9.0,) * 3, "by_seed": {0: 80.0}}
    line = report.verdicts([pmod, free])[1]
    assert (
        line
        == "p-MoD above FastV K=2 at equal TFLOPs: not settled (one seed) (+10.0 points on one seed)."
    )
    pmod["by_seed"][1], free["by_seed"][1] = 85.0, 70.0  # differences 10, 15
    assert "not settled: the interval holds 0 (+12.5 [" in report.verdicts([pmod, free])[1]
    pmod["by_seed"][2], free["by_seed"][2] = 82.0, 70.0  # differences 10, 15, 12
    line = report.verdicts([pmod, free])[1]
    assert line.startswith("p-MoD above FastV K=2 at equal TFLOPs: supported")
    assert line.endswith("(+12.3 [+6.1, +18.6] points over 3 seeds).")


def test_the_report_checks_every_run_length_up_to_the_design(scripts, tmp_path, capsys):
    """An earlier design's check (1500 -> 2250) stays in the report next to this one's."""
    _, report = scripts
    data = records(random.Random(1))
    data.append({**data[-1], "steps": 3375, "final": column(75.0, 400, random.Random(2))})
    assert report.run_lengths(data, 2250) == [(1500, 2250)]
    assert report.run_lengths(data, 5063) == [(1500, 2250), (2250, 3375)]
    report.report(data, 3375, 5063, tmp_path / "curves.png")
    out = capsys.readouterr().out
    assert "convergence, dense seed 0: 60.0 at 1500 steps, 61.0 at 2250 (+1.0)" in out
    assert "convergence, dense seed 0: 61.0 at 2250 steps, 75.0 at 3375 (+14.0)" in out
    assert "SD over seeds at 2250: one seed: not settled (no spread yet)" in out
    assert "convergence: no 5063-step run yet" in out


def test_an_accuracy_interval_stays_within_0_and_100(scripts):
    _, report = scripts
    row = {"name": "p-MoD (beta 0.5)", "accuracy": (90.2, -33.6, 214.1), "difference": None,
           "mcnemar": [], "seeds": [0, 1], "tflops": 0.64, "kv": 0.6}  # fmt: skip
    assert "| 90.2 [0.0, 100.0] |" in report.table_lines([row], 3375)[-1]
    row["difference"] = (5.2, -89.8, 100.2)  # two seeds' paired differences reach past +100 too
    assert "| +5.2 [-89.8, +100.0] |" in report.table_lines([row], 3375)[-1]
