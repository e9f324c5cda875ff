"""Training: the tiny recipes end to end, exact resume, NaN stop, checkpoints, DeepSpeed on two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PMOD_CACHE", str(ROOT / ".cache" / "pmod-tests"))

import pmod_cli  # noqa: E402,F401 - registers the p-MoD Auto classes
from pmod_cli import cli  # noqa: E402
from pmod_cli.data.tiny import resolve_tiny_path  # noqa: E402
from pmod_cli.errors import UserError  # noqa: E402
from pmod_cli.training.build import build_model, part_of  # noqa: E402
from pmod_cli.training.recipe import load_recipe  # noqa: E402
from pmod_cli.training.stages import sft  # noqa: E402
from pmod_cli.training.trainer import NonFiniteLossError  # noqa: E402

FAST = ["train.global_batch_size=8", "train.per_device_batch_size=8", "train.logging_steps=1"]


def run_cli(monkeypatch, *argv) -> None:
    monkeypatch.setattr(sys, "argv", ["pmod", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The tiny pretrain stage, a few steps, through the command line."""
    output = tmp_path_factory.mktemp("pretrain")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(ROOT)
        run_cli(mp, "pretrain", "recipes/tiny_pretrain.toml", "--set", "train.max_steps=3", "--set", f"train.output_dir={output}",
                *sum((["--set", o] for o in FAST), []))
    finally:
        mp.undo()
    return output


def sft_recipe(output: Path, pretrained: Path, *overrides: str):
    return load_recipe(
        ROOT / "recipes" / "tiny.toml",
        [f"train.output_dir={output}", f"model.pretrained_connector={pretrained}", *FAST, *overrides],
    )


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_pretrain_trains_only_the_connector(pretrained):
    base = weights(resolve_tiny_path("tiny:base"))
    after = weights(pretrained)
    assert set(base) == set(after)
    changed = {key for key in base if not torch.equal(base[key], after[key])}
    # the connector is new (and trained); the vision tower and the LLM are untouched
    assert changed and all("multi_modal_projector" in key for key in changed)
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["stage"] == "pretrain" and summary["kv_cache_ratio"] == 1.0 and not summary["pmod"]


def test_sft_loads_the_pretrained_connector(pretrained, tmp_path):
    model, _ = build_model(sft_recipe(tmp_path, pretrained), "sft")
    saved = {k.split("multi_modal_projector.", 1)[1]: v for k, v in weights(pretrained).items() if "multi_modal_projector" in k}
    for name, parameter in model.model.multi_modal_projector.named_parameters():
        assert torch.equal(parameter.detach(), saved[name])
    trainable = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector", "llm", "router"}


def test_tiny_sft_end_to_end(pretrained, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    output = tmp_path / "sft"
    run_cli(monkeypatch, "sft", "recipes/tiny.toml", "--set", "train.max_steps=12", "--set", f"train.output_dir={output}",
            "--set", f"model.pretrained_connector={pretrained}", *sum((["--set", o] for o in FAST), []))
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["samples"] == 96 and summary["pmod"]
    assert summary["final_loss"] < summary["first_loss"] - 1.0  # the SFT loss clearly falls
    assert summary["flops_ratio"] < 1.0 and summary["kv_cache_ratio"] < 1.0

    # the final model and the checkpoints are HF directories that load after `import pmod_cli`
    for directory in (output, output / "checkpoint-12"):
        model = AutoModelForImageTextToText.from_pretrained(directory)
        assert type(model).__name__ == "PMoDLlavaForConditionalGeneration"
        assert model.retention_ratios == summary["retention_ratios"]
        assert AutoProcessor.from_pretrained(directory).chat_template is not None
        assert load_recipe(directory / "recipe.toml").train.max_steps == 12
    assert not (output / ".incomplete").exists()

    # the same output dir again: an explicit choice is needed
    with pytest.raises(UserError, match="--resume"):
        sft(sft_recipe(output, pretrained, "train.overwrite_output_dir=false", "train.max_steps=1"))


class StopAfter(TrainerCallback):
    """Interrupts a run after ``step`` optimizer steps, as a preempted job would stop."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_continues_exactly(pretrained, tmp_path):
    steps = ["train.max_steps=6", "train.save_steps=3"]
    uninterrupted = sft(sft_recipe(tmp_path / "a", pretrained, *steps))
    sft(sft_recipe(tmp_path / "b", pretrained, *steps), callbacks=[StopAfter(3)])
    assert (tmp_path / "b" / "checkpoint-3").is_dir() and not (tmp_path / "b" / "checkpoint-6").exists()
    resumed = sft(sft_recipe(tmp_path / "b", pretrained, *steps), resume=True)

    expected = dict(uninterrupted.losses)
    after_resume = [(step, loss) for step, loss in resumed.losses if step > 3]
    assert [step for step, _ in after_resume] == [4, 5, 6]
    for step, loss in after_resume:
        assert loss == pytest.approx(expected[step], abs=1e-6)
    final_a, final_b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=1e-6)

    with pytest.raises(UserError, match="no checkpoint"):
        sft(sft_recipe(tmp_path / "empty", pretrained, *steps), resume=True)


class PoisonAfter(TrainerCallback):
    """Makes the next loss NaN, as a diverging run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(pretrained, tmp_path):
    recipe = sft_recipe(tmp_path, pretrained, "train.max_steps=6", "train.save_steps=2")
    # poisoned after step 3 (checkpoint-2 was saved before): step 4 is the first NaN loss
    with pytest.raises(NonFiniteLossError, match=r"nan at step 4.*checkpoint-2"):
        sft(recipe, callbacks=[PoisonAfter(3)])
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "config.json").exists()
    good = weights(tmp_path / "checkpoint-2")
    assert all(bool(torch.isfinite(t).all()) for t in good.values())


def test_dense_baseline_and_llava_next_anyres(tmp_path):
    dense = sft(load_recipe(ROOT / "recipes" / "tiny.toml", [
        f"train.output_dir={tmp_path / 'dense'}", "model.pretrained_connector=", "pmod.enabled=false",
        "train.max_steps=2", *FAST,
    ]))
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "llava"
    assert dense.summary["flops_ratio"] == 1.0

    # a LLaVA-NeXT checkpoint, anyres images of several shapes, p-MoD on
    next_ = sft(load_recipe(ROOT / "recipes" / "tiny.toml", [
        f"train.output_dir={tmp_path / 'next'}", "model.vision_tower=", "model.llm=", "model.pretrained_connector=",
        "model.checkpoint=tiny:base_next", "data.image_aspect_ratio=anyres", "train.max_steps=2", *FAST,
    ]))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "next")
    assert type(model).__name__ == "PMoDLlavaNextForConditionalGeneration"
    assert next_.summary["mean_vision_tokens"] > 16  # base crop plus high-res crops


def test_deepspeed_zero2_on_two_cpu_processes(pretrained, tmp_path):
    output = tmp_path / "ds"
    overrides = [
        "train.deepspeed=zero2", "train.max_steps=2", "train.save_steps=2", "train.global_batch_size=8",
        "train.per_device_batch_size=4", "train.logging_steps=1", f"train.output_dir={output}",
    ]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29633",
        "-m", "pmod_cli.cli", "pretrain", str(ROOT / "recipes" / "tiny_pretrain.toml"),
        *sum((["--set", o] for o in overrides), []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    # 8 samples per step = 4 per process x 2 processes x 1 accumulation
    assert summary["processes"] == 2 and summary["samples"] == 16
    assert (output / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own optimizer shards
    assert {p.name for p in (output / "checkpoint-2").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    model = AutoModelForImageTextToText.from_pretrained(output)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
