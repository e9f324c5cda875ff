"""The commands on LLaVA-OneVision checkpoints: `pmod eval` with video and several images through
lmms-eval, `pmod convert`, `pmod arank` on video samples, `pmod flops --video-frames`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_onevision import batch_inputs
from tiny_models import randomize_routers, save_checkpoint, tiny_onevision
from typer.testing import CliRunner

from pmod_cli import PMoDConfig, apply_pmod
from pmod_cli.analysis.arank import measure_arank
from pmod_cli.cli import app
from pmod_cli.data.tiny import resolve_tiny_path
from pmod_cli.evaluation.run import evaluate_checkpoints
from pmod_cli.model.loading import load_checkpoint
from pmod_cli.model.schedules import kept_count

FRAMES = 3  # frames the checkpoints sample from a video (saved with their video processor)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("onevision")
    model, processor = tiny_onevision(layers=4)
    processor.video_processor.num_frames = FRAMES
    dense = save_checkpoint(model, processor, root / "dense")
    apply_pmod(model, PMoDConfig(beta=0.5))  # 4 layers: ratios 1, 0.75, 0.25, 0.15
    randomize_routers(model)
    pmod = save_checkpoint(model, processor, root / "pmod")
    return {"dense": dense, "pmod": pmod, "root": root}


def test_eval_runs_video_and_image_pair_tasks_and_measures_them(checkpoints, tmp_path):
    output = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(checkpoints["pmod"]),
            "--tasks",
            "pmod_tiny_video,pmod_tiny_multi_image",
            "--limit",
            "4",
            "--batch-size",
            "2",
            "--output",
            str(output),
            "--device",
            "cpu",
        ],  # fmt: skip
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert (
        "pmod_tiny_video (exact_match)" in result.output
        and "pmod_tiny_multi_image (exact_match)" in result.output
    )
    report = json.loads(output.read_text())["checkpoints"][0]
    assert set(report["scores"]) == {"pmod_tiny_video", "pmod_tiny_multi_image"}
    by_task = {
        task: [m for m in report["measurements"] if m["task"] == task] for task in report["scores"]
    }
    # 3 frames of 2 x 2 pooled tokens + the closing newline; two images of 16 features + a newline each
    assert {m["vision_tokens"] for m in by_task["pmod_tiny_video"]} == {FRAMES * 4 + 1}
    assert {m["vision_tokens"] for m in by_task["pmod_tiny_multi_image"]} == {2 * 17}
    entry_bytes = 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16 dims, fp32
    for measurement in report["measurements"]:
        expected = sum(
            (measurement["text_tokens"] + kept_count(measurement["vision_tokens"], ratio))
            * entry_bytes
            for ratio in report["retention_ratios"]
        )
        assert measurement["kv_cache_bytes"] == expected


def test_video_answers_do_not_depend_on_the_batch(checkpoints):
    runs = {
        batch: evaluate_checkpoints(
            [checkpoints["pmod"]],
            ["pmod_tiny_video", "pmod_tiny_multi_image"],
            limit=4,
            batch_size=batch,
            device="cpu",
        ).checkpoints[0]
        for batch in (1, 4)
    }
    for task in ("pmod_tiny_video", "pmod_tiny_multi_image"):
        single = {row["doc_id"]: row["answer"] for row in runs[1].answers[task]}
        assert single == {row["doc_id"]: row["answer"] for row in runs[4].answers[task]}
    assert {m.batch_size for m in runs[4].measurements} == {4}


def test_convert_keeps_the_computation_of_the_original(checkpoints, tmp_path):
    output = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "pmod_cli.cli", "convert", str(checkpoints["dense"]), str(output), "--beta", "2.0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    converted, processor = load_checkpoint(output)
    dense, _ = load_checkpoint(checkpoints["dense"])
    assert (
        converted.config.model_type == "pmod_llava_onevision"
        and converted.retention_ratios == [1.0] * 4
    )
    inputs = batch_inputs(processor)
    with torch.no_grad():
        assert torch.equal(converted(**inputs).logits, dense(**inputs).logits)


def test_arank_reads_video_and_image_pair_samples(checkpoints):
    data = resolve_tiny_path("tiny:media/sft_train.json")
    result = measure_arank(
        checkpoints["pmod"], data, samples=6, batch_size=3, dense_layers=2, progress=False
    )
    assert (
        result.samples == 6 and len(result.arank) == 4 and result.checkpoint_mod_layers == [1, 2, 3]
    )
    assert sorted(result.dense_layers + result.mod_layers) == [0, 1, 2, 3]
    assert all(rank > 0 for rank in result.arank)


def test_flops_counts_a_video_from_the_cli():
    result = CliRunner().invoke(
        app, ["flops", "--model", "llava-onevision-qwen2-0.5b", "--video-frames", "32", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["vision_tokens"] == 32 * 196 + 1 and plan["vision_crops"] == 32
