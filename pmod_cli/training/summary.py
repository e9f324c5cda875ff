"""The efficiency summary at the end of a stage: a rich table and ``summary.json``.

TFLOPs and the KV cache ratio come from ``pmod_cli.efficiency.flops`` (the count behind
``pmod flops``), for a prefill of the mean sample this run saw (its mean vision and text
tokens), for this model and for its dense twin. The achieved training TFLOP/s per process count
3 x that forward pass per sample (``throughput.TRAIN_FLOPS_PER_FORWARD``); on a GPU of known
peak, model FLOPs utilisation (MFU) is their share of it. ``device_hours`` (processes x wall
time) is there whatever the device, next to ``gpu_hours`` or ``cpu_hours``.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..efficiency.flops import count_flops_for_model
from .throughput import TRAIN_FLOPS_PER_FORWARD


def efficiency_summary(
    model,
    *,
    stage: str,
    samples: int,
    tokens: int,
    vision_tokens: int,
    wall_seconds: float,
    processes: int,
    on_gpu: bool,
    steps: int,
    skipped_bad: int,
    skipped_at_load: int,
    total_samples: int,
    first_loss: float | None,
    final_loss: float | None,
    peak_memory_bytes: int = 0,
    peak_tflops: float | None = None,
    kept_ratios: dict[int, float] | None = None,
    trainable_parameters: int = 0,
    lora: bool = False,
) -> dict[str, Any]:
    return {
        "stage": stage,
        "pmod": bool(getattr(model.config, "pmod", None)),
        "steps": steps,
        **_rates(samples, tokens, wall_seconds, processes, on_gpu),
        **_flops(model, samples, tokens, vision_tokens, wall_seconds, processes, peak_tflops),
        "peak_memory_bytes": peak_memory_bytes,
        "peak_memory_kind": "cuda_allocated" if on_gpu else "cpu_rss",
        "kept_ratios": {str(layer): ratio for layer, ratio in (kept_ratios or {}).items()},
        "lora": lora,
        "trainable_parameters": trainable_parameters,
        "skipped_samples": skipped_bad + skipped_at_load,
        "skipped_bad_samples": skipped_bad,
        "skipped_at_load": skipped_at_load,
        "total_samples": total_samples,
        "first_loss": first_loss,
        "final_loss": final_loss,
    }


def _rates(
    samples: int, tokens: int, wall_seconds: float, processes: int, on_gpu: bool
) -> dict[str, Any]:
    """What the run saw, how long it took and how fast it went."""
    hours = wall_seconds * processes / 3600
    return {
        "samples": samples,
        "tokens": tokens,
        "wall_seconds": wall_seconds,
        "processes": processes,
        "device": "gpu" if on_gpu else "cpu",
        "gpu_hours" if on_gpu else "cpu_hours": hours,
        "device_hours": hours,
        "samples_per_second": samples / wall_seconds if wall_seconds else 0.0,
        "tokens_per_second": tokens / wall_seconds if wall_seconds else 0.0,
    }


def _flops(
    model,
    samples: int,
    tokens: int,
    vision_tokens: int,
    wall_seconds: float,
    processes: int,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """The count of the mean sample's prefill, and the training TFLOP/s (and MFU) it implies."""
    mean_vision = round(vision_tokens / samples) if samples else 0
    mean_text = round((tokens - vision_tokens) / samples) if samples else 0
    flops = count_flops_for_model(
        model, vision_tokens=mean_vision, text_tokens=max(mean_text, 1), count="paper"
    )
    train_tflops = (
        TRAIN_FLOPS_PER_FORWARD * flops.tflops * samples / wall_seconds / processes
        if wall_seconds
        else 0.0
    )
    return {
        "mean_vision_tokens": mean_vision,
        "mean_text_tokens": mean_text,
        "tflops_per_sample": flops.tflops,
        "dense_tflops_per_sample": flops.baseline_tflops,
        "flops_ratio": flops.ratio,
        "flops_count": flops.count,
        "kv_cache_ratio": flops.kv_cache_ratio,
        "retention_ratios": list(flops.retention_ratios),
        "train_tflops_per_second": train_tflops,
        "peak_tflops": peak_tflops,
        "mfu": train_tflops / peak_tflops if peak_tflops else None,
    }


def summary_table(summary: dict[str, Any]) -> Table:
    hours_key = "gpu_hours" if summary["device"] == "gpu" else "cpu_hours"
    hours_label = "GPU-hours" if summary["device"] == "gpu" else "CPU-hours (processes x wall)"
    model_kind = "p-MoD" if summary["pmod"] else "dense"
    table = Table(title=f"{summary['stage']}: efficiency ({model_kind} model)")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("steps", f"{summary['steps']}"),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        (hours_label, f"{summary[hours_key]:.4f}"),
        ("samples/s", f"{summary['samples_per_second']:.2f}"),
        ("tokens/s", f"{summary['tokens_per_second']:.0f}"),
        (
            "mean sample",
            f"{summary['mean_vision_tokens']} vision + {summary['mean_text_tokens']} text tokens",
        ),
        ("prefill TFLOPs/sample, this model", f"{summary['tflops_per_sample']:.6f}"),
        ("prefill TFLOPs/sample, dense twin", f"{summary['dense_tflops_per_sample']:.6f}"),
        ("  ratio", f"{summary['flops_ratio']:.1%}"),
        ("KV cache (mean R_l)", f"{summary['kv_cache_ratio']:.1%}"),
        ("training TFLOP/s per process (3 x forward)", f"{summary['train_tflops_per_second']:.4g}"),
        *_mfu_rows(summary),
        (_memory_label(summary), f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB"),
        ("skipped samples", f"{summary['skipped_samples']} of {summary['total_samples']}"),
    ]
    if summary["first_loss"] is not None and summary["final_loss"] is not None:
        rows.append(("loss", f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"))
    for label, value in rows:
        table.add_row(label, value)
    table.caption = f"TFLOPs: {summary['flops_count']} count of one forward pass (as pmod flops)"
    return table


def _mfu_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    if summary["device"] != "gpu":
        return []
    if summary["mfu"] is None:
        return [("MFU", "- (GPU peak unknown: set PMOD_PEAK_TFLOPS, or not bf16/fp16)")]
    return [(f"MFU (of {summary['peak_tflops']:g} TFLOP/s)", f"{summary['mfu']:.1%}")]


def _memory_label(summary: dict[str, Any]) -> str:
    if summary["peak_memory_kind"] == "cuda_allocated":
        return "peak memory (CUDA allocated, largest process)"
    return "peak memory (resident set, largest process)"
