"""The commands on every registered family that takes video, on its saved tiny checkpoints: `pmod
eval` runs video and image-pair tasks through lmms-eval (the KV cache measured as T + kept, the
answers the same in any batch), `pmod convert` keeps the computation, `pmod arank` reads video and
image-pair samples. The families' model equivalences are in test_conformance.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_conformance import BUILDERS, batch_inputs
from tiny_models import randomize_routers, save_checkpoint
from typer.testing import CliRunner

from pmod_cli import PMoDConfig, apply_pmod
from pmod_cli.analysis.arank import measure_arank
from pmod_cli.cli import app
from pmod_cli.data.tiny import resolve_tiny_path
from pmod_cli.evaluation.run import evaluate_checkpoints
from pmod_cli.model.families import FAMILIES, get_family
from pmod_cli.model.loading import load_checkpoint
from pmod_cli.model.schedules import kept_count

pytestmark = pytest.mark.slow

VIDEO_FAMILIES = [name for name in sorted(FAMILIES) if get_family(name).takes_video]
FRAMES = 4  # frames the checkpoints sample from a video (saved with their video processor)
TASKS = ("pmod_tiny_video", "pmod_tiny_multi_image")
# vision tokens a sample of each task has, where the family's layout fixes them: OneVision pools a
# frame's 4 x 4 features to 2 x 2 and closes the video with a newline; an image is 16 + a newline
VISION_TOKENS = {
    "llava_onevision": {"pmod_tiny_video": FRAMES * 4 + 1, "pmod_tiny_multi_image": 34}
}


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def checkpoints(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model, processor = BUILDERS[name]()
    # as a trained checkpoint saves it: FRAMES frames a video, spread by pmod
    get_family(name).set_video_frames(processor.video_processor, FRAMES)
    dense = save_checkpoint(model, processor, root / "dense")
    apply_pmod(model, PMoDConfig(beta=0.5))  # 4 layers: ratios 1, 0.75, 0.25, 0.15
    randomize_routers(model)
    pmod = save_checkpoint(model, processor, root / "pmod")
    return {"dense": dense, "pmod": pmod, "name": name}


def test_eval_runs_video_and_image_pair_tasks_and_measures_them(checkpoints, tmp_path):
    output = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        ["eval", str(checkpoints["pmod"]), "--tasks", ",".join(TASKS), "--limit", "3",
         "--batch-size", "2", "--output", str(output), "--device", "cpu"],
        terminal_width=200,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert all(f"{task} (exact_match)" in result.output for task in TASKS)
    report = json.loads(output.read_text())["checkpoints"][0]
    assert set(report["scores"]) == set(TASKS)
    expected_vision = VISION_TOKENS.get(checkpoints["name"], {})
    entry_bytes = 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16 dims, fp32
    for measurement in report["measurements"]:
        assert measurement["vision_tokens"] == expected_vision.get(
            measurement["task"], measurement["vision_tokens"]
        )
        assert measurement["vision_tokens"] > 0
        expected = sum(
            (measurement["text_tokens"] + kept_count(measurement["vision_tokens"], ratio))
            * entry_bytes
            for ratio in report["retention_ratios"]
        )
        assert measurement["kv_cache_bytes"] == expected


def test_video_answers_do_not_depend_on_the_batch(checkpoints):
    runs = {
        batch: evaluate_checkpoints(
            [checkpoints["pmod"]], list(TASKS), limit=4, batch_size=batch, device="cpu"
        ).checkpoints[0]
        for batch in (1, 4)
    }
    for task in TASKS:
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
    assert converted.config.model_type == get_family(checkpoints["name"]).pmod_model_type
    assert converted.retention_ratios == [1.0] * 4
    inputs = batch_inputs(dense, processor)  # an image, two images, a video; padded
    with torch.no_grad():
        assert torch.equal(converted(**inputs).logits, dense(**inputs).logits)


def test_arank_reads_video_and_image_pair_samples(checkpoints):
    data = resolve_tiny_path("tiny:media/sft_train.json")
    result = measure_arank(
        checkpoints["pmod"], data, samples=6, batch_size=3, dense_layers=2, progress=False
    )
    assert result.samples == 6 and len(result.arank) == 4
    assert result.checkpoint_mod_layers == [1, 2, 3]
    assert sorted(result.dense_layers + result.mod_layers) == [0, 1, 2, 3]
    assert all(rank > 0 for rank in result.arank)
