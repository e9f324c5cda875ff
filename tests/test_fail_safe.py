"""Failures a user can cause or meet end in one line, and nothing already saved is lost.

Damaged weight files in every command that loads a checkpoint; data that is not UTF-8; a dry
run that must see what the real run rejects; a run that diverges; two runs into one output
directory; a full disk; ``--resume`` with another recipe or of a finished run; SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import random_image, save_checkpoint, tiny_model
from transformers import TrainerCallback

from pmod_cli import apply_pmod
from pmod_cli.cli import main
from pmod_cli.data.tiny import resolve_tiny_path
from pmod_cli.errors import UserError
from pmod_cli.training.recipe import load_recipe
from pmod_cli.training.run_lock import LOCK_FILE, RunLock
from pmod_cli.training.stages import sft
from pmod_cli.training.trainer import CheckpointSpaceError, NonFiniteLossError

# training runs stopped, killed, diverging or out of disk, and damaged weights; one worker builds
# the module's runs once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fail_safe")]

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.global_batch_size=4", "train.per_device_batch_size=4", "train.logging_steps=1"]


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["pmod", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- damaged weight files, in every command that loads a checkpoint -------------------------


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _damage(kind: str, source: Path, sharded: Path, target: Path) -> str:
    """A copy of a checkpoint with one kind of damage; returns the file the error must name."""
    shutil.copytree(sharded if kind in ("bad_shard", "missing_shard") else source, target)
    if kind == "truncated":
        _truncate(target / "model.safetensors")
        return "model.safetensors"
    if kind in ("bad_shard", "missing_shard"):
        shard = sorted(target.glob("model-*.safetensors"))[1]
        _truncate(shard) if kind == "bad_shard" else shard.unlink()
        return shard.name
    if kind == "bad_pickle":
        weights = load_file(str(target / "model.safetensors"))
        (target / "model.safetensors").unlink()
        torch.save(weights, target / "pytorch_model.bin")
        _truncate(target / "pytorch_model.bin")
        return "pytorch_model.bin"
    if kind == "bad_header":  # whole length, but a tensor's shape disagrees with its bytes
        file = target / "model.safetensors"
        data = file.read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        first = next(key for key in header if key != "__metadata__")
        header[first]["shape"] = [1]
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= size
        file.write_bytes(data[:8] + text.ljust(size) + data[8 + size :])
        return str(file)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    model, processor = tiny_model(layers=2)
    apply_pmod(model, beta=0.5)
    save_checkpoint(model, processor, root / "whole")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    processor.save_pretrained(root / "sharded")
    random_image(56, 56, seed=3).save(root / "image.png")
    question = {
        "id": "q",
        "image": "image.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}],
    }
    (root / "questions.json").write_text(json.dumps([question]))
    return {"whole": root / "whole", "sharded": root / "sharded", "root": root}


COMMANDS = {
    "convert": lambda ckpt, out, root: ["convert", ckpt, out / "converted"],
    "eval": lambda ckpt, out, root: [
        "eval",
        ckpt,
        "--tasks",
        "pmod_tiny_vqa",
        "--limit",
        "1",
        "--device",
        "cpu",
    ],
    "visualize": lambda ckpt, out, root: [
        "visualize",
        root / "image.png",
        "--checkpoint",
        ckpt,
        "--output",
        out / "f.png",
    ],
    "arank": lambda ckpt, out, root: [
        "arank",
        ckpt,
        "--data",
        root / "questions.json",
        "--dense-layers",
        "1",
        "--output",
        out / "a.png",
    ],
}


@pytest.mark.parametrize("kind", ["truncated", "bad_shard", "missing_shard", "bad_pickle"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_damaged_weights_are_one_line_naming_the_file(
    checkpoints, tmp_path, monkeypatch, capsys, command, kind
):
    damaged = tmp_path / "ckpt"
    named = _damage(kind, checkpoints["whole"], checkpoints["sharded"], damaged)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(
        monkeypatch, capsys, *COMMANDS[command](damaged, out, checkpoints["root"])
    )
    line = one_error_line(err)
    assert code == 2 and named in line, line
    assert list(out.iterdir()) == []  # nothing written


def test_damage_only_from_pretrained_sees_is_one_line_too(
    checkpoints, tmp_path, monkeypatch, capsys
):
    damaged = tmp_path / "ckpt"
    named = _damage("bad_header", checkpoints["whole"], checkpoints["sharded"], damaged)
    code, _, err = run_cli(monkeypatch, capsys, "convert", damaged, tmp_path / "converted")
    line = one_error_line(err)
    assert code == 2 and f"cannot read the weights in {named}" in line
    assert not (tmp_path / "converted").exists()


def test_whole_checkpoints_still_load(checkpoints, tmp_path, monkeypatch, capsys):
    for name in ("whole", "sharded"):  # the checks do not reject what is fine
        code, out, _ = run_cli(monkeypatch, capsys, "convert", checkpoints[name], tmp_path / name)
        assert code == 0 and (tmp_path / name / "config.json").is_file()


# ---- tiny training runs on a small slice of the tiny set -------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    records = json.loads(resolve_tiny_path("tiny:shapes/sft_train.json").read_text())[:24]
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(records))
    return path


def recipe(output: Path, data: Path, *overrides: str):
    return load_recipe(
        ROOT / "recipes" / "tiny.toml",
        [
            f"train.output_dir={output}",
            "model.pretrained_connector=",
            f"data.path={data}",
            f"data.image_folder={resolve_tiny_path('tiny:shapes/images')}",
            "train.overwrite_output_dir=false",
            *FAST,
            *overrides,
        ],
    )


def all_finite(checkpoint: Path) -> bool:
    tensors = list(load_file(str(checkpoint / "model.safetensors")).values())
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    tensors += [
        t for state in optimizer["state"].values() for t in state.values() if torch.is_tensor(t)
    ]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---- non-UTF-8 data ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_bytes", "dry_run"),
    [(b"caf\xe9", False), (b"x\xed\xa0\x80y", True)],  # Latin-1 text; a surrogate written as bytes
)
def test_data_that_is_not_utf8_is_one_line_with_the_offset(
    small_data, tmp_path, monkeypatch, capsys, bad_bytes, dry_run
):
    text = small_data.read_bytes()
    marker = b'"value": "'
    offset = text.index(marker, 5000) + len(marker)  # a few samples in
    data = tmp_path / "bad.json"
    data.write_bytes(text[:offset] + bad_bytes + text[offset:])
    offset += bad_bytes.index(b"\xe9" if b"\xe9" in bad_bytes else b"\xed")
    argv = [
        "sft",
        ROOT / "recipes" / "tiny.toml",
        "--set",
        f"train.output_dir={tmp_path / 'run'}",
        "--set",
        "model.pretrained_connector=",
        "--set",
        f"data.path={data}",
    ]
    code, _, err = run_cli(monkeypatch, capsys, *argv, *(["--dry-run"] if dry_run else []))
    line = one_error_line(err)
    assert code == 2 and str(data) in line and f"byte offset {offset} " in line, line
    assert not (tmp_path / "run" / "checkpoint-1").exists()


# ---- the dry run sees what the real run rejects ------------------------------------------------


def test_dry_run_finds_truncated_images_and_answers_past_max_length(
    small_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("COLUMNS", "400")  # one plan line per sample, however long its path
    records = json.loads(small_data.read_text())[:20]
    images = resolve_tiny_path("tiny:shapes/images")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((images / records[0]["image"]).read_bytes()[:600])
    with Image.open(truncated) as image:  # the header still reads: only a full decode fails
        assert image.size[0] > 0
    records[0]["image"] = str(truncated)
    records[1]["conversations"][0]["value"] += " tell me" * 400  # the answer starts past 512 tokens
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    argv = [
        "sft",
        ROOT / "recipes" / "tiny.toml",
        "--dry-run",
        "--set",
        f"data.path={data}",
        "--set",
        "model.pretrained_connector=",
        "--set",
        f"train.output_dir={tmp_path / 'run'}",
    ]

    code, out, err = run_cli(monkeypatch, capsys, *argv, "--set", "data.max_bad_fraction=0.05")
    out = " ".join(out.split())
    assert f"bad sample {records[0]['id']}: image {truncated} is unreadable" in out
    assert f"bad sample {records[1]['id']}: no assistant reply left" in out
    assert (
        "20 samples, 18 usable" in out
        and "2 bad, 2 of them only when loaded in full (encoded)" in out
    )
    line = one_error_line(err)
    assert code == 2 and "2 of 20 samples are bad" in line and "data.max_bad_fraction 0.05" in line

    code, out, err = run_cli(monkeypatch, capsys, *argv, "--set", "data.max_bad_fraction=0.2")
    assert code == 0 and "error:" not in err and "a real run would stop" not in out


# ---- divergence ------------------------------------------------------------------------------


def test_divergence_never_publishes_a_poisoned_checkpoint_and_the_advice_works(
    small_data, tmp_path
):
    absurd = [
        f"train.{key}=1e6" for key in ("learning_rate", "connector_lr", "llm_lr", "router_lr")
    ]
    steps = ["train.max_steps=4", "train.save_steps=1", "train.save_total_limit=0"]
    with pytest.raises(NonFiniteLossError) as stopped:
        sft(recipe(tmp_path, small_data, *steps, *absurd))
    message = str(stopped.value)
    named = Path(re.search(r"the last verified checkpoint is (\S+) \(step", message).group(1))
    published = sorted(tmp_path.glob("checkpoint-*"))
    # the named checkpoint is the last one published, and every published one is finite
    assert published and published[-1] == named and all(all_finite(c) for c in published)
    assert not (tmp_path / ".incomplete").exists() and not (tmp_path / "config.json").exists()

    # the advice: resume from it with lower rates under the keys it names
    keys = re.findall(r"--set (train\.\w+)=", message)
    assert keys and "--resume" in message
    resumed = sft(
        recipe(tmp_path, small_data, *steps, *absurd, *[f"{key}=1e-3" for key in keys]), resume=True
    )
    step = int(named.name.split("-")[1])
    after = [entry for entry in resumed.log_history if "loss" in entry and entry["step"] > step]
    assert [entry["step"] for entry in after] == list(range(step + 1, 5))
    assert all(entry["learning_rate"] <= 1e-3 for entry in after)  # the new rate, not the saved one
    assert all(all_finite(c) for c in tmp_path.glob("checkpoint-*"))


# ---- resume with another recipe; a finished run ---------------------------------------------


@pytest.fixture(scope="module")
def finished_run(small_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("finished")
    sft(recipe(output, small_data, "train.max_steps=2", "train.save_steps=1"))
    return output


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["pmod.beta=0.4"], "pmod.beta 0.5 -> 0.4"),
        (["pmod.enabled=false"], "pmod.enabled true -> false"),
        (["data.max_length=256", "train.seed=1"], "data.max_length 512 -> 256, train.seed 42 -> 1"),
        ([], "is finished: checkpoint-2 reached train.max_steps = 2"),
    ],
)
def test_resume_refuses_another_model_or_data_and_a_finished_run(
    finished_run, small_data, overrides, named
):
    before = {path: path.stat().st_mtime_ns for path in finished_run.rglob("*")}
    grow = [] if not overrides else ["train.max_steps=4"]
    with pytest.raises(UserError, match=re.escape(named)):
        sft(
            recipe(
                finished_run,
                small_data,
                "train.max_steps=2",
                "train.save_steps=1",
                *grow,
                *overrides,
            ),
            resume=True,
        )
    assert {path: path.stat().st_mtime_ns for path in finished_run.rglob("*")} == before


def test_dry_run_exits_2_where_the_real_run_refuses(finished_run, small_data, monkeypatch, capsys):
    argv = [
        "sft",
        ROOT / "recipes" / "tiny.toml",
        "--dry-run",
        "--set",
        f"train.output_dir={finished_run}",
        "--set",
        "model.pretrained_connector=",
        "--set",
        f"data.path={small_data}",
        "--set",
        "train.overwrite_output_dir=false",
        "--set",
        "train.max_steps=2",
    ]
    code, _, err = run_cli(monkeypatch, capsys, *argv)
    assert code == 2 and "holds checkpoints of an earlier run" in one_error_line(err)
    code, _, err = run_cli(monkeypatch, capsys, *argv, "--resume")
    assert code == 2 and "is finished" in one_error_line(err)


# ---- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: room for one tiny checkpoint (16 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here (needs root): {result.stderr.decode().strip()}"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_keeps_the_last_checkpoint_and_names_the_space(small_disk, small_data):
    output = small_disk / "run"
    steps = ["train.max_steps=3", "train.save_steps=1", "train.save_total_limit=1"]
    with pytest.raises(CheckpointSpaceError) as stopped:
        sft(recipe(output, small_data, *steps))
    message = str(stopped.value)
    assert f"no space left on the device of {output} while saving checkpoint-2" in message
    needed = float(re.search(r"it needs about ([\d.]+) MB", message).group(1))
    on_disk = sum(f.stat().st_size for f in (output / "checkpoint-1").iterdir()) / 1e6
    assert (
        0.9 * on_disk < needed <= 1.01 * on_disk
    )  # weights + optimizer state: the bulk of a checkpoint
    assert f"{output / 'checkpoint-1'} is untouched" in message
    assert not (output / ".incomplete").exists() and not (output / LOCK_FILE).exists()
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-1"] and all_finite(
        output / "checkpoint-1"
    )

    # more room, then --resume finishes the run from checkpoint-1
    subprocess.run(["mount", "-o", "remount,size=80m", str(small_disk)], check=True)
    resumed = sft(recipe(output, small_data, *steps), resume=True)
    assert [step for step, _ in resumed.losses if step > 1] == [2, 3] and (
        output / "config.json"
    ).is_file()


# ---- one run per output directory; SIGTERM / SIGINT ----------------------------------------------


def test_a_second_run_is_refused_and_sigterm_saves_where_it_stopped(small_data, tmp_path):
    output = tmp_path / "run"
    overrides = [
        "train.max_steps=400",
        "train.save_steps=1000",
        f"train.output_dir={output}",
        "model.pretrained_connector=",
        f"data.path={small_data}",
        f"data.image_folder={resolve_tiny_path('tiny:shapes/images')}",
        *FAST,
    ]
    command = [
        sys.executable,
        "-m",
        "pmod_cli",
        "sft",
        str(ROOT / "recipes" / "tiny.toml"),
        *sum((["--set", o] for o in overrides), []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in first.stdout:  # wait until it trains
            if re.match(r"step\s+2\s", line):
                break
        with pytest.raises(
            UserError,
            match=rf"in use by another run: pid {first.pid} on {re.escape(socket.gethostname())}",
        ):
            sft(recipe(output, small_data, "train.max_steps=400"))
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[-1] == err.strip().splitlines()[-1], err[-2000:]
    stop = re.match(
        r"error: stopped by SIGTERM at step (\d+) of 400 and saved (\S+) there; add --resume",
        errors[0],
    )
    assert stop, errors[0]
    step, saved = int(stop.group(1)), Path(stop.group(2))
    assert saved == output / f"checkpoint-{step}" and saved.is_dir()
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == step
    assert not (output / LOCK_FILE).exists()  # released on the way out

    resumed = sft(recipe(output, small_data, f"train.max_steps={step + 2}"), resume=True)
    assert [s for s, _ in resumed.losses if s > step] == [step + 1, step + 2]


class SignalAt(TrainerCallback):
    """Sends this process a real signal at the end of a step, as Ctrl-C in the terminal does."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_ctrl_c_stops_at_the_step_boundary_with_a_checkpoint(small_data, tmp_path):
    from pmod_cli.training.interrupt import RunInterrupted

    # Ctrl-C as in a terminal: a background job of a shell script starts with SIGINT ignored, and
    # pmod leaves an ignored signal alone
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(
            RunInterrupted, match=r"stopped by SIGINT at step 2 of 6 and saved .*checkpoint-2"
        ) as stopped:
            sft(
                recipe(tmp_path, small_data, "train.max_steps=6", "train.save_steps=5"),
                callbacks=[SignalAt(2, signal.SIGINT)],
            )
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert stopped.value.exit_code == 130 and restored is signal.default_int_handler
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"] and all_finite(
        tmp_path / "checkpoint-2"
    )
    assert not (tmp_path / "config.json").exists()  # an interrupted run publishes no final model


# ---- the lock of a run that died --------------------------------------------------------------


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    script = (
        "import os, signal, sys\n"
        "from pmod_cli.training.run_lock import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"  # dies holding it, as kill -9 leaves a run
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dead = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, timeout=120
    )
    assert dead.returncode == -signal.SIGKILL
    left = json.loads((tmp_path / LOCK_FILE).read_text())
    lock = RunLock(tmp_path)
    with caplog.at_level("WARNING", logger="pmod_cli.training.run_lock"):
        lock.acquire()
    try:
        assert f"no longer running (pid {left['pid']} on {socket.gethostname()}" in caplog.text
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by another run: pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # held: even this process cannot take it twice
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    again = RunLock(tmp_path)
    again.acquire()  # free again
    again.release()
