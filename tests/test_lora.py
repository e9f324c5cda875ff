"""LoRA / QLoRA through PEFT, experiment tracking and the efficiency log, on the tiny recipes.

The LoRA runs start from the tiny base checkpoint (``model.checkpoint = tiny:base``), so that
their adapter directories have a base to load on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import random_image
from transformers import TrainerCallback

import pmod_cli  # noqa: F401 - registers the p-MoD Auto classes
from pmod_cli import PMoDConfig, apply_pmod
from pmod_cli.data.tiny import resolve_tiny_path
from pmod_cli.errors import UserError
from pmod_cli.model.adapters import ADAPTER_INFO_FILE, FULL_WEIGHTS_FILE
from pmod_cli.model.loading import _load_full_weights, load_checkpoint, read_model_type
from pmod_cli.model.schedules import kept_count
from pmod_cli.model.weights import read_file
from pmod_cli.training.build import build_model
from pmod_cli.training.plan import make_training_plan
from pmod_cli.training.recipe import load_recipe
from pmod_cli.training.stages import sft
from pmod_cli.training.trainer import NonFiniteLossError

# LoRA / QLoRA training runs, one under DeepSpeed ZeRO-3 on two processes
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.global_batch_size=8", "train.per_device_batch_size=8", "train.logging_steps=1"]
TARGETS = ("q_proj", "v_proj", "down_proj")
RANK = 4


def lora_recipe(output: Path, *overrides: str):
    return load_recipe(
        ROOT / "recipes" / "tiny.toml",
        [
            f"train.output_dir={output}",
            "model.vision_tower=",
            "model.llm=",
            "model.checkpoint=tiny:base",
            "model.pretrained_connector=",
            *FAST,
            "lora.enabled=true",
            f"lora.r={RANK}",
            "lora.alpha=16",
            "lora.dropout=0.0",
            f"lora.targets={json.dumps(list(TARGETS))}",
            *overrides,
        ],
    )


def tiny_inputs(processor):
    return processor(
        images=[random_image(112, 112, 0)],
        text=["USER: <image>\nWhat colour is the square? ASSISTANT:"],
        return_tensors="pt",
    )


def unmerged_model(adapter: Path):
    """Base + p-MoD + the parts trained in full + PEFT's adapter, NOT merged."""
    from peft import PeftModel

    info = json.loads((adapter / ADAPTER_INFO_FILE).read_text())
    base, _ = load_checkpoint(info["base"])
    apply_pmod(base, PMoDConfig.from_dict(info["pmod"]))
    _load_full_weights(base, read_file(adapter / FULL_WEIGHTS_FILE), adapter)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = list(log_dir.iterdir())
    events = EventAccumulator(str(run))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def test_lora_sft_learns_trains_only_its_parts_and_merges_exactly(tmp_path):
    output = tmp_path / "lora"
    steps = ["train.max_steps=8", "train.save_steps=8", "train.report_to=tensorboard"]
    result = sft(lora_recipe(output, *steps))
    summary = result.summary
    assert summary["lora"] and summary["steps"] == 8
    assert summary["final_loss"] < summary["first_loss"] - 0.5  # it learns

    # only the adapted layers, the connector and the (new) routers changed; the adapted
    # layers by a rank-r update
    base = read_file(resolve_tiny_path("tiny:base") / "model.safetensors")
    merged = read_file(output / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    adapted = {
        name
        for name in base
        if name.startswith("language_model.")
        and name.endswith(tuple(f"{t}.weight" for t in TARGETS))
    }  # the vision tower's q_proj / v_proj are left alone
    projector = {name for name in base if "multi_modal_projector" in name}
    assert changed == adapted | projector
    assert set(merged) - set(base) == {n for n in merged if ".router." in n} != set()
    for name in adapted:
        assert torch.linalg.matrix_rank(merged[name] - base[name]) <= RANK
    # the trainable count: adapters (r x (in + out) per adapted layer), connector, routers
    adapters = sum(RANK * sum(base[name].shape) for name in adapted)
    full = sum(t.numel() for n, t in merged.items() if ".router." in n or n in projector)
    assert summary["trainable_parameters"] == adapters + full

    # merged (the final model) == adapter directory (checkpoint-8, merged on load) == the
    # adapter applied unmerged by PEFT
    final, processor = load_checkpoint(output)
    from_adapter, _ = load_checkpoint(output / "checkpoint-8")
    reference = unmerged_model(output / "checkpoint-8")
    inputs = tiny_inputs(processor)
    with torch.no_grad():
        expected = reference(**inputs).logits
        torch.testing.assert_close(final(**inputs).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(from_adapter(**inputs).logits, expected, rtol=0, atol=1e-5)

    # the Trainer's TensorBoard integration got the efficiency figures of every logged step
    logged = scalars(output / "runs")
    for tag in (
        "loss",
        "tokens_per_second",
        "samples_per_second",
        "tflops_per_second",
        "peak_memory_gib",
    ):
        assert [step for step, _ in logged[f"train/{tag}"]] == list(range(1, 9)), tag
        assert all(value > 0 for _, value in logged[f"train/{tag}"]), tag
    # every image has 64 vision tokens: layer l keeps exactly floor(64 R_l) of them
    ratios = final.retention_ratios
    kept = {tag: values for tag, values in logged.items() if "kept_ratio" in tag}
    assert len(kept) == sum(r < 1 for r in ratios) == 4
    for layer, ratio in enumerate(ratios):
        if ratio < 1:
            values = [value for _, value in kept[f"train/kept_ratio/layer_{layer:02d}"]]
            assert len(values) == 8 and values == pytest.approx([kept_count(64, ratio) / 64] * 8)
    assert summary["kept_ratios"] == {
        str(layer): pytest.approx(kept_count(64, r) / 64) for layer, r in enumerate(ratios) if r < 1
    }
    assert summary["device_hours"] == summary["cpu_hours"] > 0 and summary["peak_memory_bytes"] > 0


class StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_lora_resume_continues_exactly_and_the_adapter_alone_loads(tmp_path, monkeypatch):
    steps = ["train.max_steps=4", "train.save_steps=2"]
    uninterrupted = sft(lora_recipe(tmp_path / "a", *steps))
    adapter_only = lora_recipe(tmp_path / "b", *steps, "lora.save=adapter")
    sft(adapter_only, callbacks=[StopAfter(2)])
    assert (tmp_path / "b" / "checkpoint-2" / ADAPTER_INFO_FILE).is_file()
    resumed = sft(lora_recipe(tmp_path / "b", *steps, "lora.save=adapter"), resume=True)
    expected = dict(uninterrupted.losses)
    after = [(step, loss) for step, loss in resumed.losses if step > 2]
    assert [step for step, _ in after] == [3, 4]
    for step, loss in after:
        assert loss == pytest.approx(expected[step], abs=1e-6)

    # the final adapter alone (no config.json) loads to the same model as the merged run
    assert not (tmp_path / "b" / "config.json").exists()
    assert read_model_type(tmp_path / "b") == "pmod_llava"
    merged, processor = load_checkpoint(tmp_path / "a")
    adapter, _ = load_checkpoint(tmp_path / "b", require_pmod=True)
    inputs = tiny_inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(
            adapter(**inputs).logits, merged(**inputs).logits, rtol=0, atol=1e-5
        )

    # pmod convert writes the adapter directory out as the merged checkpoint
    from typer.testing import CliRunner

    from pmod_cli.cli import app

    converted = CliRunner().invoke(app, ["convert", str(tmp_path / "b"), str(tmp_path / "c")])
    assert converted.exit_code == 0, converted.output
    written, _ = load_checkpoint(tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(
            written(**inputs).logits, merged(**inputs).logits, rtol=0, atol=1e-5
        )

    # pmod visualize takes the adapter directory as it takes a checkpoint

    image = tmp_path / "image.png"
    random_image(112, 112, 3).save(image)
    shown = CliRunner().invoke(
        app,
        [
            "visualize",
            str(image),
            "--checkpoint",
            str(tmp_path / "b"),
            "--output",
            str(tmp_path / "v.png"),
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "v.png").is_file()


class PoisonAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.get_base_model().lm_head.weight.fill_(float("nan"))


def test_lora_divergence_keeps_the_last_verified_adapter(tmp_path):
    recipe = lora_recipe(
        tmp_path, "train.max_steps=6", "train.save_steps=2", "train.overwrite_output_dir=false"
    )
    with pytest.raises(NonFiniteLossError, match=r"nan at step 4.*checkpoint-2"):
        sft(recipe, callbacks=[PoisonAfter(3)])
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "config.json").exists()
    saved = read_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert saved and all(bool(torch.isfinite(t).all()) for t in saved.values())


def test_qlora_without_cuda_is_one_error_line(tmp_path, monkeypatch, capsys):
    from pmod_cli import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    output = tmp_path / "out"
    argv = [
        "pmod",
        "sft",
        str(ROOT / "recipes" / "tiny.toml"),
        "--set",
        f"train.output_dir={output}",
    ]
    monkeypatch.setattr(
        sys, "argv", [*argv, "--set", "lora.enabled=true", "--set", "lora.qlora=true"]
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: lora.qlora") and "CUDA" in lines[0]
    assert "lora.qlora = false" in lines[0]
    assert not output.exists() or not any(output.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.enabled=true", "lora.save=adapter"], "model.checkpoint"),
        (["lora.qlora=true"], "lora.enabled = true"),
        (["lora.enabled=true", "lora.qlora=true", "train.deepspeed=zero3"], "zero3"),
        (["lora.enabled=true", "lora.dropout=1.0"], "lora.dropout"),
        (["lora.enabled=true", "lora.save=both"], "lora.save"),
        (["train.report_to=tensorbord"], "train.report_to"),
        (['train.report_to=["none", "wandb"]'], "none"),
    ],
)
def test_lora_and_tracking_recipe_errors(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(ROOT / "recipes" / "tiny.toml", overrides)


def test_lora_targets_and_stage_are_checked(tmp_path):
    with pytest.raises(UserError, match="lora.targets names qkv_proj"):
        build_model(lora_recipe(tmp_path, 'lora.targets=["qkv_proj"]'), "sft")
    with pytest.raises(UserError, match="pretrain"):
        build_model(lora_recipe(tmp_path), "pretrain")


def test_llava_next_lora_recipe_plans_its_trainable_parameters():
    recipe = load_recipe(ROOT / "recipes" / "llava_next_lora.toml")
    plan = make_training_plan("sft", recipe)
    # Vicuna-7B: per layer q, k, v, o (4096 -> 4096), gate, up (4096 -> 11008), down (11008 -> 4096)
    per_layer = 4 * 128 * (4096 + 4096) + 3 * 128 * (4096 + 11008)
    assert plan.parameters["llm"][0] == 32 * per_layer == 319_815_680
    assert plan.parameters["connector"][0] == plan.parameters["connector"][1] > 2e7
    assert plan.parameters["router"] == (24 * 4097, 24 * 4097)
    assert plan.parameters["vision_tower"][0] == 0
    assert plan.trainable_parameters == sum(trainable for trainable, _ in plan.parameters.values())
    assert "224 layers" in plan.lora and "r 128, alpha 256" in plan.lora
    # on this machine only the data and the pretrain output are missing, as for llava_next.toml
    assert len(plan.blockers) == 2 and all(
        "not found" in b or "pretrain" in b for b in plan.blockers
    )
    resolved = load_recipe(ROOT / "recipes" / "llava_next_lora.toml").to_toml()
    assert "[lora]" in resolved and "group_by_modality_length = true" in resolved


def test_lora_under_zero3_on_two_cpu_processes_saves_merged_and_resumes(tmp_path, free_port):
    """ZeRO-3 partitions the adapters and the base alike: checkpoints are adapter directories
    plus DeepSpeed's own shards (trainable tensors only), the final model is gathered and
    merged, and --resume continues from DeepSpeed's shards."""
    output = tmp_path / "z3"
    overrides = [
        "model.vision_tower=", "model.llm=", "model.checkpoint=tiny:base", "model.pretrained_connector=",
        "train.deepspeed=zero3", "train.max_steps=2", "train.save_steps=2", "train.global_batch_size=2",
        "train.per_device_batch_size=1", "train.logging_steps=1", f"train.output_dir={output}",
        "lora.enabled=true", f"lora.r={RANK}", "lora.alpha=16", f"lora.targets={json.dumps(list(TARGETS))}",
    ]  # fmt: skip

    def launch(*extra: str) -> None:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
            "-m", "pmod_cli", "sft", str(ROOT / "recipes" / "tiny.toml"), *sum((["--set", o] for o in overrides), []),
            *extra,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr[-3000:]

    launch()
    checkpoint = output / "checkpoint-2"
    assert (checkpoint / "global_step2").is_dir() and (checkpoint / ADAPTER_INFO_FILE).is_file()
    model, _ = load_checkpoint(output)
    assert type(model).__name__ == "PMoDLlavaForConditionalGeneration"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    base = read_file(resolve_tiny_path("tiny:base") / "model.safetensors")
    merged = read_file(output / "model.safetensors")
    assert not torch.equal(merged["language_model.model.layers.0.self_attn.q_proj.weight"],
                           base["language_model.model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert torch.equal(merged["language_model.model.layers.0.self_attn.k_proj.weight"],
                       base["language_model.model.layers.0.self_attn.k_proj.weight"])  # fmt: skip

    launch("--resume", "--set", "train.max_steps=3", "--set", "train.save_steps=3")
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert (
        state["global_step"] == 3
        and json.loads((output / "summary.json").read_text())["steps"] == 3
    )
