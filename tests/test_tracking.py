"""What LLaVA trainers expect around the training loop: wandb offline without a network, batches
of one modality, the efficiency summary's device-independent keys."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from pmod_cli import PMoDConfig, apply_pmod
from pmod_cli.data.llava_data import load_records
from pmod_cli.data.tiny import resolve_tiny_path
from pmod_cli.training.recipe import load_recipe
from pmod_cli.training.sampler import ModalityLengthSampler, modality_lengths
from pmod_cli.training.summary import efficiency_summary, summary_table
from pmod_cli.training.throughput import PEAK_TFLOPS_ENV, peak_tflops
from pmod_cli.training.tracking import tracker_environment

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once closed


@pytest.mark.slow
def test_wandb_goes_offline_when_its_server_cannot_be_reached(tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    recipe = load_recipe(
        ROOT / "recipes" / "tiny.toml", [f"train.output_dir={tmp_path}", "train.report_to=wandb"]
    )
    with tracker_environment(recipe, is_main=True) as applied:
        assert os.environ["WANDB_MODE"] == "offline" == applied["WANDB_MODE"]
        assert (
            os.environ["WANDB_DIR"] == str(tmp_path.resolve())
            and os.environ["WANDB_PROJECT"] == "pmod"
        )
    assert "WANDB_MODE" not in os.environ and "WANDB_DIR" not in os.environ  # restored

    # a mode the user set wins; no key at all means offline as well
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with tracker_environment(recipe, is_main=True) as applied:
        assert os.environ["WANDB_MODE"] == "disabled" and "WANDB_MODE" not in applied
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with tracker_environment(recipe, is_main=True) as applied:
        assert applied["WANDB_MODE"] == "offline"
    # no tracker: nothing is touched
    plain = load_recipe(ROOT / "recipes" / "tiny.toml", [f"train.output_dir={tmp_path}"])
    with tracker_environment(plain, is_main=True) as applied:
        assert applied == {}


def test_modality_batches_are_of_one_modality_and_of_similar_length():
    records = load_records(resolve_tiny_path("tiny:shapes/sft_train.json")).select(range(200))
    rows = records.to_list()
    for index in range(0, 200, 3):  # a third of the samples text-only
        rows[index]["image"] = None
    lengths = modality_lengths(rows, range(len(rows)))
    assert sum(length < 0 for length in lengths) == 67 and 0 not in lengths
    sampler = ModalityLengthSampler(lengths, global_batch=16, micro_batch=4, seed=7)
    order = list(sampler)
    assert sorted(order) == list(range(200))  # every sample once
    batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    mixed = [batch for batch in batches if len({lengths[i] > 0 for i in batch}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] is batches[-1])  # the leftovers end the epoch
    for batch in batches[:-1]:  # micro-batches hold consecutive lengths of the sorted batch
        micro = [sorted(abs(lengths[i]) for i in batch[j : j + 4]) for j in range(0, 16, 4)]
        for i, a in enumerate(micro):
            for b in micro[i + 1 :]:
                assert a[-1] <= b[0] or b[-1] <= a[0]
    # the same order for the same (seed, epoch), another for the next epoch
    again = ModalityLengthSampler(lengths, global_batch=16, micro_batch=4, seed=7)
    assert list(again) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


def summary_of(on_gpu: bool, peak: float | None) -> dict:
    model, _ = tiny_model(layers=4)
    apply_pmod(model, PMoDConfig(beta=0.5))
    counts = dict(samples=64, tokens=64 * 120, vision_tokens=64 * 16, steps=8)
    return efficiency_summary(
        model, stage="sft", wall_seconds=2.0, processes=2, on_gpu=on_gpu, skipped_bad=0,
        skipped_at_load=0, total_samples=64, first_loss=3.0, final_loss=2.0,
        peak_memory_bytes=3 * 2**30, peak_tflops=peak, **counts,
    )  # fmt: skip


def cells(summary: dict) -> str:
    return "\n".join(
        str(cell) for column in summary_table(summary).columns for cell in column._cells
    )


def test_summary_has_device_hours_peak_memory_and_mfu_on_a_gpu(monkeypatch):
    cpu = summary_of(on_gpu=False, peak=None)
    assert cpu["device_hours"] == cpu["cpu_hours"] == pytest.approx(2 * 2.0 / 3600)
    # 3 x the forward count of `pmod flops` per sample, per process
    expected = 3 * cpu["tflops_per_sample"] * 64 / 2.0 / 2
    assert cpu["train_tflops_per_second"] == pytest.approx(expected) and cpu["mfu"] is None
    assert (
        "peak memory (resident set" in cells(cpu)
        and "3.00 GiB" in cells(cpu)
        and "MFU" not in cells(cpu)
    )
    gpu = summary_of(on_gpu=True, peak=989.4)
    assert gpu["device_hours"] == gpu["gpu_hours"] and gpu["mfu"] == pytest.approx(expected / 989.4)
    assert "MFU (of 989.4 TFLOP/s)" in cells(gpu) and "CUDA allocated" in cells(gpu)
    assert "GPU peak unknown" in cells(summary_of(on_gpu=True, peak=None))
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "123.5")
    assert peak_tflops(torch.device("cpu")) == 123.5
    monkeypatch.delenv(PEAK_TFLOPS_ENV)
    assert peak_tflops(torch.device("cpu")) is None


@pytest.mark.parametrize(
    "name", ["H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A10G", "NVIDIA A100-SXM4-80GB"]
)
def test_gpu_peaks_match_the_most_specific_name(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    expected = {
        "H100 80GB HBM3": 989.4,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA A10G": 70.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
    }
    assert peak_tflops(torch.device("cuda", 0)) == expected[name]
