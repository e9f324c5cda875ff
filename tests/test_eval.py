"""`pmod eval` and the lmms-eval model ``pmod``, end to end on tiny checkpoints and the offline
tiny task (the held-out split of the synthetic set, built in the pmod cache on first use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import random_image, randomize_routers, tiny_model
from typer.testing import CliRunner

from pmod_cli import PMoDConfig, apply_pmod
from pmod_cli.cli import app, main
from pmod_cli.evaluation.run import PAPER_GROUP, evaluate_checkpoints, make_task_manager
from pmod_cli.evaluation.tasks import TASKS_DIR
from pmod_cli.model.cache import kv_cache_bytes
from pmod_cli.model.schedules import kept_count

PAPER_TASKS = [
    "ok_vqa", "scienceqa_img", "mme", "seedbench", "pope", "realworldqa", "gqa", "ai2d",
    "textvqa_val", "chartqa", "docvqa_val", "infovqa_val", "mmbench_en_dev", "mmmu_val",
]  # fmt: skip


def save(model, processor, directory: Path) -> Path:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dense_model, processor = tiny_model(layout="llava", layers=4)
    dense = save(dense_model, processor, root / "dense")
    apply_pmod(dense_model, PMoDConfig(beta=0.5))  # 4 layers: ratios 1, 0.75, 0.25, 0.15
    randomize_routers(dense_model)
    pmod = save(dense_model, processor, root / "pmod")
    next_model, next_processor = tiny_model(layout="next", layers=4)
    apply_pmod(next_model, PMoDConfig(beta=0.5))
    randomize_routers(next_model)
    pmod_next = save(next_model, next_processor, root / "pmod_next")
    return {"dense": dense, "pmod": pmod, "pmod_next": pmod_next, "root": root}


def expected_kv_bytes(measurement: dict, ratios: list[float], entry_bytes: int) -> int:
    """What a sample should hold after prefill: T + floor(V * R_l) entries in layer l."""
    vision, text = measurement["vision_tokens"], measurement["text_tokens"]
    return sum((text + kept_count(vision, ratio)) * entry_bytes for ratio in ratios)


def test_pmod_eval_reports_accuracy_and_measured_efficiency(checkpoints, tmp_path):
    output = tmp_path / "reports" / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval", str(checkpoints["pmod"]), str(checkpoints["dense"]),
            "--tasks", "pmod_tiny_vqa,pmod_tiny_vqa_mc", "--limit", "4", "--batch-size", "2",
            "--output", str(output), "--device", "cpu",
        ],  # fmt: skip
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    for row in (
        "pmod_tiny_vqa (exact_match)", "pmod_tiny_vqa_mc (acc)", "TFLOPs (paper count)",
        "KV cache per sample", "prefill latency", "end-to-end latency", "peak RSS growth (CPU)",
    ):  # fmt: skip
        assert row in result.output
    assert list(output.parent.iterdir()) == [output]  # written through a temporary file, renamed

    report = json.loads(output.read_text())
    pmod, dense = report["checkpoints"]
    assert [pmod["label"], dense["label"]] == ["pmod", "dense"]
    assert pmod["retention_ratios"] == pytest.approx([1.0, 0.75, 0.25, 0.15])
    assert dense["retention_ratios"] == [1.0] * 4
    for checkpoint in (pmod, dense):
        assert set(checkpoint["scores"]) == {"pmod_tiny_vqa", "pmod_tiny_vqa_mc"}
        assert all(0.0 <= score["value"] <= 1.0 for score in checkpoint["scores"].values())
        assert len(checkpoint["answers"]["pmod_tiny_vqa"]) == 4
        generated = [m for m in checkpoint["measurements"] if m["request"] == "generate_until"]
        scored = [m for m in checkpoint["measurements"] if m["request"] == "loglikelihood"]
        assert len(generated) == 4 and len(scored) >= 4 * 2  # every choice of 4 questions
        assert all(m["batch_size"] == 2 and m["vision_tokens"] == 16 for m in generated)
        # the system prompt stands before the image; the question after it
        assert all(0 < m["prefix_text_tokens"] < m["text_tokens"] for m in generated)
        assert all(0 < m["prefill_s"] <= m["end_to_end_s"] for m in checkpoint["measurements"])

    # the dense model holds exactly its dense twin's cache; p-MoD holds T + floor(V R_l) per layer,
    # also at batch 2 with left padding
    assert dense["efficiency"]["kv_cache_vs_dense"] == 1.0
    assert dense["efficiency"]["tflops_vs_dense"] == 1.0
    entry_bytes = 2 * 2 * 16 * 4  # K and V, 2 kv heads of 16 dims, fp32
    for measurement in pmod["measurements"]:
        assert measurement["kv_cache_bytes"] == expected_kv_bytes(measurement, pmod["retention_ratios"], entry_bytes)
        assert measurement["dense_kv_cache_bytes"] == expected_kv_bytes(measurement, [1.0] * 4, entry_bytes)
    assert pmod["efficiency"]["kv_cache_vs_dense"] < 1.0
    assert pmod["efficiency"]["tflops_vs_dense"] < 1.0
    # same shape, same prompts: the same dense reference
    assert pmod["efficiency"]["dense_tflops"] == dense["efficiency"]["dense_tflops"]


def test_batched_generation_answers_like_batch_one(checkpoints):
    # LLaVA-NeXT: held-out images of several aspect ratios give different numbers of vision
    # tokens per sample, so a batch is really padded
    runs = {
        batch: evaluate_checkpoints(
            [checkpoints["pmod_next"]], ["pmod_tiny_vqa"], limit=6, batch_size=batch, device="cpu"
        ).checkpoints[0]
        for batch in (1, 4)
    }
    single, batched = runs[1], runs[4]
    vision_counts = {m.vision_tokens for m in single.measurements}
    assert len(vision_counts) > 1
    answers = {row["doc_id"]: row["answer"] for row in single.answers["pmod_tiny_vqa"]}
    assert answers == {row["doc_id"]: row["answer"] for row in batched.answers["pmod_tiny_vqa"]}
    assert any(answer for answer in answers.values())
    # each sample holds the same cache whatever it was batched with (padding not counted)
    by_doc = {m.doc_id: m.kv_cache_bytes for m in single.measurements}
    assert by_doc == {m.doc_id: m.kv_cache_bytes for m in batched.measurements}
    assert {m.batch_size for m in batched.measurements} == {4, 2}


def test_loglikelihood_is_the_continuation_loss(checkpoints):
    from lmms_eval.api.instance import Instance

    from pmod_cli.evaluation.lmms_model import PMoDLmms
    from pmod_cli.evaluation.measure import PrefillProbe

    lm = PMoDLmms(pretrained=str(checkpoints["pmod"]), device="cpu")
    image = random_image(56, 56, seed=3)
    lm.task_dict = {"shapes": {"test": [{"image": image}]}}
    args = ("What colour is the square?", " red", lambda doc: [doc["image"]], 0, "shapes", "test")
    (result,) = lm.loglikelihood([Instance("loglikelihood", args, idx=0, metadata={"task": "shapes", "doc_id": 0, "repeats": 1})])
    nll, greedy = result.text  # lmms-eval reads the pair from GenerationResult.text

    # reference: HF's own loss over the continuation tokens, on the same prompt
    prompt = lm.processor(text=[lm.build_prompt(args[0], 1)], images=[image], return_tensors="pt")
    continuation = lm.tokenizer(" red", add_special_tokens=False, return_tensors="pt").input_ids
    input_ids = torch.cat([prompt["input_ids"], continuation], dim=1)
    labels = input_ids.clone()
    labels[:, : prompt["input_ids"].shape[1]] = -100
    with torch.no_grad():
        loss = lm.model(input_ids=input_ids, pixel_values=prompt["pixel_values"], labels=labels).loss
    assert nll == pytest.approx(loss.item() * continuation.shape[1], rel=1e-4)
    assert isinstance(greedy, bool)

    # the probe's per-sample bytes are the cache's own bytes at batch 1
    probe = PrefillProbe(lm.model, torch.device("cpu"))
    probe.start(torch.ones_like(prompt["input_ids"]))
    with torch.no_grad():
        cache = lm.model(**prompt, use_cache=True).past_key_values
    probe.stop()
    assert probe.kv_bytes == [kv_cache_bytes(cache)]
    assert probe.dense_kv_bytes[0] > probe.kv_bytes[0]


def test_lmms_eval_command_line_runs_the_pmod_model(checkpoints, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "pmod",
        "--model_args", f"pretrained={checkpoints['pmod']},device=cpu",
        "--tasks", "pmod_tiny_vqa", "--include_path", str(TASKS_DIR),
        "--limit", "3", "--batch_size", "2", "--output_path", str(tmp_path / "lmms"),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Error during evaluation" not in completed.stdout + completed.stderr
    (results_file,) = (tmp_path / "lmms").rglob("*results.json")
    results = json.loads(results_file.read_text())
    assert "exact_match,none" in results["results"]["pmod_tiny_vqa"]
    assert results["config"]["model"] == "pmod"
    # the model's measurements reach lmms-eval's own summary
    assert results["throughput"]["avg_prefill_latency_s"] > 0
    assert 0 < results["throughput"]["avg_kv_cache_vs_dense"] < 1


def test_paper_benchmarks_resolve_and_the_group_names_all_14():
    manager = make_task_manager([PAPER_GROUP])
    missing = [task for task in PAPER_TASKS if task not in manager.all_tasks]
    assert missing == []
    assert PAPER_GROUP in manager.all_groups
    group = yaml.safe_load((TASKS_DIR / "pmod_paper14" / "pmod_paper14.yaml").read_text())
    assert group["task"] == PAPER_TASKS


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["pmod", "eval", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{root}/missing", "--tasks", "pmod_tiny_vqa"], "checkpoint directory not found"),
        (["{pmod}", "--tasks", "pmod_tiny_vqa", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["{pmod}", "--tasks", "pmod_tiny_vqa", "--limit", "0"], "--limit must be at least 1"),
        (["{pmod}", "--tasks", "pmod_tiny_vqa", "--device", "tpu"], "--device must be cpu or cuda"),
        (["{pmod}", "--tasks", "pmod_tiny_vqa", "--count", "most"], "unknown FLOPs count 'most'"),
        (["{pmod}", "--tasks", "pmod_tiny_vqa", "--include-path", "{root}/none"], "is not a directory"),
        (["{pmod}", "--tasks", "pmod_tiny_vqa,mmee"], "unknown task 'mmee'; did you mean mme"),
    ],
)
def test_user_errors_exit_2_with_one_line(checkpoints, monkeypatch, capsys, arguments, message):
    arguments = [a.format(root=checkpoints["root"], pmod=checkpoints["pmod"]) for a in arguments]
    code, stderr = run_main(monkeypatch, capsys, *arguments)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr
    assert stderr.count("\n") == 1


@pytest.mark.skipif(os.environ.get("HF_DATASETS_OFFLINE") != "1", reason="would download MME")
def test_a_benchmark_without_its_data_is_a_user_error(checkpoints, monkeypatch, capsys):
    code, stderr = run_main(monkeypatch, capsys, str(checkpoints["pmod"]), "--tasks", "mme", "--limit", "1")
    assert code == 2
    # the model loads first (its progress bar), then one line, no traceback
    assert stderr.splitlines()[-1].startswith("error: cannot fetch the data of mme")
    assert "Traceback" not in stderr and stderr.count("error:") == 1
