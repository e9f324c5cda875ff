"""Training: the tiny recipes end to end, exact resume, NaN stop, checkpoints, DeepSpeed on two CPU processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

ROOT = Path(__file__).resolve().parents[1]

import pmod_cli  # noqa: E402,F401 - registers the p-MoD Auto classes
from pmod_cli import cli  # noqa: E402
from pmod_cli.data.tiny import resolve_tiny_path  # noqa: E402
from pmod_cli.errors import UserError  # noqa: E402
from pmod_cli.training.build import build_model, part_of  # noqa: E402
from pmod_cli.training.recipe import load_recipe  # noqa: E402
from pmod_cli.training.stages import sft  # noqa: E402
from pmod_cli.training.trainer import NonFiniteLossError, on_every_rank, publish_model  # noqa: E402

# training runs (the tiny pretrain and SFT stages, DeepSpeed, two-process runs); one worker builds
# the pretrained fixture once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]

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
        run_cli(
            mp,
            "pretrain",
            "recipes/tiny_pretrain.toml",
            "--set",
            "train.max_steps=3",
            "--set",
            f"train.output_dir={output}",
            *sum((["--set", o] for o in FAST), []),
        )
    finally:
        mp.undo()
    return output


def sft_recipe(output: Path, pretrained: Path, *overrides: str):
    return load_recipe(
        ROOT / "recipes" / "tiny.toml",
        [
            f"train.output_dir={output}",
            f"model.pretrained_connector={pretrained}",
            *FAST,
            *overrides,
        ],
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
    assert (
        summary["stage"] == "pretrain" and summary["kv_cache_ratio"] == 1.0 and not summary["pmod"]
    )


def test_sft_loads_the_pretrained_connector(pretrained, tmp_path):
    model, _ = build_model(sft_recipe(tmp_path, pretrained), "sft")
    saved = {
        k.split("multi_modal_projector.", 1)[1]: v
        for k, v in weights(pretrained).items()
        if "multi_modal_projector" in k
    }
    for name, parameter in model.model.multi_modal_projector.named_parameters():
        assert torch.equal(parameter.detach(), saved[name])
    trainable = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector", "llm", "router"}


def test_tiny_sft_end_to_end(pretrained, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    output = tmp_path / "sft"
    run_cli(
        monkeypatch,
        "sft",
        "recipes/tiny.toml",
        "--set",
        "train.max_steps=12",
        "--set",
        f"train.output_dir={output}",
        "--set",
        f"model.pretrained_connector={pretrained}",
        *sum((["--set", o] for o in FAST), []),
    )
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
    assert (tmp_path / "b" / "checkpoint-3").is_dir() and not (
        tmp_path / "b" / "checkpoint-6"
    ).exists()
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
    recipe = sft_recipe(
        tmp_path,
        pretrained,
        "train.max_steps=6",
        "train.save_steps=2",
        "train.overwrite_output_dir=false",
    )
    # a staging folder left by a crashed run is not reused for the same step
    leftover = tmp_path / ".incomplete" / "checkpoint-2"
    leftover.mkdir(parents=True)
    (leftover / "stale.bin").write_text("from a crashed run")
    # poisoned after step 3 (checkpoint-2 was saved before): step 4 is the first NaN loss
    with pytest.raises(NonFiniteLossError, match=r"nan at step 4.*checkpoint-2"):
        sft(recipe, callbacks=[PoisonAfter(3)])
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "config.json").exists()
    assert not (tmp_path / "checkpoint-2" / "stale.bin").exists()
    good = weights(tmp_path / "checkpoint-2")
    assert all(bool(torch.isfinite(t).all()) for t in good.values())


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.path=typo.json", "typo.json"),
        ("model.pretrained_connector=runs/no_such_pretrain", "no_such_pretrain"),
        ("pmod.ratios=[1, 0.5]", "pmod.ratios"),
        ("pmod.mod_layers=[2, 9]", "pmod.mod_layers"),
    ],
)
def test_user_errors_keep_the_checkpoints_of_an_earlier_run(pretrained, tmp_path, override, named):
    earlier = tmp_path / "checkpoint-5"
    earlier.mkdir()
    (earlier / "model.safetensors").write_text("an earlier run")
    (tmp_path / ".incomplete").mkdir()
    recipe = sft_recipe(tmp_path, pretrained, "train.overwrite_output_dir=true", override)
    with pytest.raises(UserError, match=re.escape(named)):
        sft(recipe)
    assert (earlier / "model.safetensors").read_text() == "an earlier run"
    assert (tmp_path / ".incomplete").is_dir()


class Initialised(Exception):
    """Stops run_stage right after the model is built."""


def test_seed_fixes_the_fresh_connector(tmp_path, monkeypatch):
    from pmod_cli.training import stages

    def build_and_stop(recipe, stage, dtype):
        model, _ = build_model(recipe, stage, dtype)
        raise Initialised(model.model.multi_modal_projector.linear_1.weight.detach().clone())

    monkeypatch.setattr(stages, "build_model", build_and_stop)

    def fresh_connector(seed: int) -> torch.Tensor:
        recipe = load_recipe(
            ROOT / "recipes" / "tiny.toml",
            [
                f"train.output_dir={tmp_path}",
                "model.pretrained_connector=",
                f"train.seed={seed}",
                *FAST,
            ],
        )
        with pytest.raises(Initialised) as stopped:
            sft(recipe)
        return stopped.value.args[0]

    first = fresh_connector(7)
    torch.manual_seed(123)  # whatever ran before does not matter
    assert torch.equal(fresh_connector(7), first)
    assert not torch.equal(fresh_connector(8), first)


class FakeAccelerator:
    def wait_for_everyone(self) -> None:
        pass


class FakeTrainer:
    """What publish_model uses of a trainer; save_model writes the given files."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.args = SimpleNamespace(should_save=True, device=torch.device("cpu"))
        self.accelerator = FakeAccelerator()
        self.recipe_toml = "# recipe\n"

    def save_model(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            (Path(directory) / name).write_text(text)


def test_publish_model_replaces_a_whole_model_or_nothing(tmp_path):
    publish_model(FakeTrainer({"config.json": "old", "model.safetensors": "old"}), tmp_path)
    # a sharded save replaces the single file; config.json comes last
    publish_model(
        FakeTrainer(
            {
                "config.json": "new",
                "model-00001-of-00002.safetensors": "new",
                "model-00002-of-00002.safetensors": "new",
                "model.safetensors.index.json": "new",
            }
        ),
        tmp_path,
    )
    assert (
        not (tmp_path / "model.safetensors").exists()
        and (tmp_path / "config.json").read_text() == "new"
    )
    assert not (tmp_path / ".incomplete").exists()
    # no weights saved (e.g. ZeRO-3 without gathering them): the model in place is left alone
    with pytest.raises(UserError, match="no model weights"):
        publish_model(FakeTrainer({"config.json": "broken"}), tmp_path)
    assert (tmp_path / "config.json").read_text() == "new"
    assert (tmp_path / "model-00001-of-00002.safetensors").read_text() == "new"


def _agree(rank: int, world_size: int, port: int, results) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        results.put((rank, on_every_rank(rank != 1, "cpu"), on_every_rank(True, "cpu")))
    finally:
        torch.distributed.destroy_process_group()


def test_non_finite_check_agrees_across_ranks(free_port):
    """One rank's NaN stops every rank (none is left waiting in a collective)."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_agree, args=(rank, 2, free_port, results)) for rank in range(2)
    ]
    for process in processes:
        process.start()
    found = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert found == [(0, False, True), (1, False, True)]


def test_dense_baseline_and_llava_next_anyres(tmp_path):
    dense = sft(
        load_recipe(
            ROOT / "recipes" / "tiny.toml",
            [
                f"train.output_dir={tmp_path / 'dense'}",
                "model.pretrained_connector=",
                "pmod.enabled=false",
                "train.max_steps=2",
                *FAST,
            ],
        )
    )
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "llava"
    assert dense.summary["flops_ratio"] == 1.0

    # a LLaVA-NeXT checkpoint, anyres images of several shapes, p-MoD on
    next_ = sft(
        load_recipe(
            ROOT / "recipes" / "tiny.toml",
            [
                f"train.output_dir={tmp_path / 'next'}",
                "model.vision_tower=",
                "model.llm=",
                "model.pretrained_connector=",
                "model.checkpoint=tiny:base_next",
                "data.image_aspect_ratio=anyres",
                "train.max_steps=2",
                *FAST,
            ],
        )
    )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "next")
    assert type(model).__name__ == "PMoDLlavaNextForConditionalGeneration"
    assert next_.summary["mean_vision_tokens"] > 16  # base crop plus high-res crops


def test_zero3_sft_with_text_only_micro_batches_on_two_cpu_processes(
    pretrained, tmp_path, free_port
):
    # every other sample has no image; one sample per process and step, so the processes'
    # micro-batches differ in whether they run the vision tower: ZeRO-3's collectives must
    # still match (without the blank-image pass this crashes with a collective mismatch)
    records = json.loads(resolve_tiny_path("tiny:shapes/sft_train.json").read_text())[:8]
    for index, record in enumerate(records):
        if index % 2:
            del record["image"]
            for turn in record["conversations"]:
                turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    output = tmp_path / "z3"
    overrides = [
        "train.deepspeed=zero3",
        "train.max_steps=3",
        "train.save_steps=3",
        "train.global_batch_size=2",
        "train.per_device_batch_size=1",
        "train.logging_steps=1",
        f"train.output_dir={output}",
        f"model.pretrained_connector={pretrained}",
        f"data.path={data}",
        f"data.image_folder={resolve_tiny_path('tiny:shapes/images')}",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port),
        "-m",
        "pmod_cli",
        "sft",
        str(ROOT / "recipes" / "tiny.toml"),
        *sum((["--set", o] for o in overrides), []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["samples"] == 6
    model = AutoModelForImageTextToText.from_pretrained(output)
    assert type(model).__name__ == "PMoDLlavaForConditionalGeneration"
    assert all(torch.isfinite(p).all() for p in model.parameters())


EXIT_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
import torch, torch.distributed as dist
from pmod_cli.process_exit import exit_process

dist.init_process_group("gloo")
rank, out = dist.get_rank(), Path(sys.argv[1])
atexit.register(lambda: (out / f"{rank}.atexit").write_text(str(dist.is_initialized())))
late = lambda: (time.sleep(0.5), (out / f"{rank}.thread").write_text("joined"))
threading.Thread(target=late).start()
tensor = torch.ones(4)
dist.all_reduce(tensor)  # gloo's worker threads hold it a moment after the caller goes on
del tensor
print(f"rank {rank} done", end="")  # not flushed yet
exit_process(0)
"""


def test_a_process_of_a_two_process_run_ends_like_python_without_its_teardown(tmp_path, free_port):
    # the ending that keeps gloo's worker threads out of the interpreter's teardown (a random
    # SIGABRT at exit otherwise) still does what Python's exit does before that teardown
    script = tmp_path / "end.py"
    script.write_text(EXIT_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port), str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 done" in result.stdout and "rank 1 done" in result.stdout
    for rank in (0, 1):
        assert (tmp_path / f"{rank}.thread").read_text() == "joined"
        # the atexit handlers ran, after the process group was destroyed
        assert (tmp_path / f"{rank}.atexit").read_text() == "False"


def test_deepspeed_zero2_on_two_cpu_processes(pretrained, tmp_path, free_port):
    output = tmp_path / "ds"
    overrides = [
        "train.deepspeed=zero2",
        "train.max_steps=2",
        "train.save_steps=2",
        "train.global_batch_size=8",
        "train.per_device_batch_size=4",
        "train.logging_steps=1",
        f"train.output_dir={output}",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port),
        "-m",
        "pmod_cli.cli",
        "pretrain",
        str(ROOT / "recipes" / "tiny_pretrain.toml"),
        *sum((["--set", o] for o in overrides), []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # DeepSpeed logs through its own handler on stdout; pmod keeps stdout for results
    assert not re.search(r"\] \[(INFO|WARNING)\] \[", result.stdout), result.stdout[-2000:]
    if not torch.cuda.is_available():
        assert "Setting accelerator to CPU" in result.stderr
    summary = json.loads((output / "summary.json").read_text())
    # 8 samples per step = 4 per process x 2 processes x 1 accumulation
    assert summary["processes"] == 2 and summary["samples"] == 16
    assert (output / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own optimizer shards
    assert {p.name for p in (output / "checkpoint-2").glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    model = AutoModelForImageTextToText.from_pretrained(output)
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_onevision_sft_on_images_pairs_and_videos(tmp_path):
    """The tiny OneVision from parts, a few steps on a small media set (single images, pairs,
    videos); then from the tiny OneVision checkpoint with its own chat template."""
    from pmod_cli.data.media import generate

    media = generate(tmp_path / "media", train_samples=4, heldout_samples=1)
    recipe = ROOT / "recipes" / "llava_onevision_tiny.toml"
    common = [
        f"data.path={media / 'sft_train.json'}",
        "data.video_frames=3",
        "train.max_steps=3",
        *FAST,
    ]
    result = sft(
        load_recipe(
            recipe,
            [f"train.output_dir={tmp_path / 'parts'}", "model.pretrained_connector=", *common],
        )
    )
    summary = result.summary
    assert summary["steps"] == 3 and summary["pmod"] and summary["flops_ratio"] < 1.0
    # video tokens count as vision tokens: 3 frames x 4 + 1 for a third of the samples
    assert summary["mean_vision_tokens"] > 20
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "parts")
    processor = AutoProcessor.from_pretrained(tmp_path / "parts")
    assert type(model).__name__ == "PMoDLlavaOnevisionForConditionalGeneration"
    assert processor.video_processor.num_frames == 3  # evaluation samples as many frames

    base = resolve_tiny_path("tiny:base_onevision")
    checkpoint_run = sft(
        load_recipe(
            recipe,
            [
                f"train.output_dir={tmp_path / 'checkpoint'}",
                "model.vision_tower=",
                "model.llm=",
                "model.pretrained_connector=",
                "model.checkpoint=tiny:base_onevision",
                "data.template=chat_template",
                "pmod.budget=image",
                *common,
            ],
        )
    )
    assert checkpoint_run.summary["steps"] == 3
    saved = AutoProcessor.from_pretrained(tmp_path / "checkpoint")
    assert (
        saved.chat_template == AutoProcessor.from_pretrained(base).chat_template
    )  # its own template stays
    assert (
        AutoModelForImageTextToText.from_pretrained(tmp_path / "checkpoint").pmod_config.budget
        == "image"
    )
