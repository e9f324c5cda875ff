"""Efficiency figures of each logged training step: what the trackers and the summary show.

Every logged step adds to the Trainer's log (and so to TensorBoard, wandb and
``trainer_state.json``), over the steps since the previous log, all processes together:

- ``tokens_per_second``, ``samples_per_second``: real tokens (image tokens included) and samples;
- ``tflops_per_second``: achieved model TFLOP/s per process: 3 x the forward FLOPs of
  ``pmod_cli.efficiency.flops`` (the count of ``pmod flops``, paper mode, at the interval's mean
  vision and text tokens) per sample, as forward + backward are usually counted; frozen parts and
  recomputation (gradient checkpointing) are not told apart;
- ``mfu``: that over the GPU's dense bf16/fp16 peak (``peak_tflops``), when training in half
  precision on a GPU whose peak is known;
- ``peak_memory_gib``: on CUDA the largest allocation peak of any process since the previous
  log; on the CPU the largest peak resident set of any process so far;
- ``kept_ratio/layer_NN``: vision tokens each MoD layer (or each layer where another method,
  ``train.method = "pdrop"``, runs a subset) kept over those it saw, measured.
"""

from __future__ import annotations

import os
import resource
import time

import torch
from transformers import TrainerCallback

from ..efficiency.flops import count_flops_for_model
from ..model import mod_layer_indices
from ..model.families import family_for_model

# forward + backward FLOPs per forward FLOP (the backward pass costs about twice the forward)
TRAIN_FLOPS_PER_FORWARD = 3
# dense bf16 / fp16 tensor-core peak TFLOP/s per GPU, from the vendors' data sheets (no sparsity)
PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "A6000": 154.8,
    "V100": 125.0,
}
PEAK_TFLOPS_ENV = "PMOD_PEAK_TFLOPS"


def peak_tflops(device: torch.device | str) -> float | None:
    """The dense half-precision peak of this process's GPU (``PMOD_PEAK_TFLOPS`` wins); None on
    the CPU or for a GPU not in ``PEAK_TFLOPS``."""
    if os.environ.get(PEAK_TFLOPS_ENV):
        return float(os.environ[PEAK_TFLOPS_ENV])
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # the longest matching key first: "H100 PCIe" before "H100", "A10G" before "A10"
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_TFLOPS[key]
    return None


def peak_memory_bytes(device: torch.device, reset: bool) -> int:
    """CUDA: the allocation peak since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class KeptTokenCounter:
    """A routing recorder (``model.routing.recording``) that sums, per MoD layer, the vision
    tokens kept and seen, on the device: no synchronisation until they are read."""

    def __init__(self) -> None:
        self.kept: dict[int, torch.Tensor] = {}
        self.seen: dict[int, torch.Tensor] = {}

    def add(self, layer_idx, ratio, keep, vision, weights, logits) -> None:
        kept, seen = (keep & vision).sum(), vision.sum()
        self.kept[layer_idx] = self.kept.get(layer_idx, 0) + kept
        self.seen[layer_idx] = self.seen.get(layer_idx, 0) + seen

    def take(self, layers: list[int], device) -> torch.Tensor:
        """(2 * len(layers),) float64: kept counts then seen counts; the counts start again."""
        values = [self.kept.get(i, 0) for i in layers] + [self.seen.get(i, 0) for i in layers]
        self.kept, self.seen = {}, {}
        if not values:  # a dense model
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.stack([torch.as_tensor(v, device=device).double() for v in values])


class StepMeter(TrainerCallback):
    """Measures the steps between two logs (see the module docstring); ``metrics`` is a
    collective: every process calls it at every logged step."""

    def __init__(self, model, half_precision: bool) -> None:
        self.model = model  # the HF model (inside DeepSpeed / PEFT wrappers)
        # p-MoD's MoD layers, or the layers where another method runs a subset (pdrop)
        self.layers = mod_layer_indices(model) or subset_layer_indices(model)
        self.counter = KeptTokenCounter()
        self.half_precision = half_precision
        self.started: float | None = None
        self.previous = torch.zeros(3, dtype=torch.float64)  # samples, tokens, vision tokens
        self.run_peak_bytes = 0
        self.run_kept = torch.zeros(2 * len(self.layers), dtype=torch.float64)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def metrics(self, counts: torch.Tensor, device: torch.device) -> dict[str, float]:
        """``counts``: this process's (samples, tokens, vision tokens) so far."""
        now = time.perf_counter()
        seconds = max(now - (self.started or now), 1e-9)
        self.started = now
        delta = counts[:3].double() - self.previous
        self.previous = counts[:3].double().clone()
        summed = torch.cat([delta.to(device), self.counter.take(self.layers, device)])
        peak = torch.tensor([float(peak_memory_bytes(device, reset=True))], device=device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(summed)
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
            world = torch.distributed.get_world_size()
        summed, peak_bytes = summed.cpu(), int(peak.item())
        self.run_peak_bytes = max(self.run_peak_bytes, peak_bytes)
        self.run_kept += summed[3:]
        samples, tokens, vision = summed[:3].tolist()
        logs = {
            "tokens_per_second": tokens / seconds,
            "samples_per_second": samples / seconds,
            "peak_memory_gib": peak_bytes / 2**30,
        }
        if samples:
            achieved = self.tflops(samples, tokens, vision) / seconds / world
            logs["tflops_per_second"] = achieved
            peak_flops = peak_tflops(device) if self.half_precision else None
            if peak_flops:
                logs["mfu"] = achieved / peak_flops
        logs.update(_kept_ratios(self.layers, summed[3:]))
        return logs

    def run_peak(self, device: torch.device) -> int:
        """The largest memory peak of any process over the whole run (a collective)."""
        own = max(self.run_peak_bytes, peak_memory_bytes(device, reset=False))
        peak = torch.tensor([float(own)], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        return int(peak.item())

    def tflops(self, samples: float, tokens: float, vision: float) -> float:
        """Training TFLOPs of ``samples`` samples holding these tokens (the mean sample, x3)."""
        mean_vision = round(vision / samples)
        mean_text = max(round((tokens - vision) / samples), 1)
        forward = count_flops_for_model(
            self.model, vision_tokens=mean_vision, text_tokens=mean_text, count="paper"
        )
        return TRAIN_FLOPS_PER_FORWARD * forward.tflops * samples

    def run_kept_ratios(self) -> dict[int, float]:
        """Kept / seen vision tokens per MoD layer over every logged interval of the run."""
        return {
            layer: kept / seen
            for layer, kept, seen in zip(
                self.layers,
                self.run_kept[: len(self.layers)].tolist(),
                self.run_kept[len(self.layers) :].tolist(),
                strict=True,
            )
            if seen
        }


def subset_layer_indices(model) -> list[int]:
    """Indices of the decoder layers where the model's method runs a subset of the tokens."""
    layers = family_for_model(model).decoder_layers(model)
    return [i for i, layer in enumerate(layers) if getattr(layer, "token_mode", "") == "subset"]


def _kept_ratios(layers: list[int], counts: torch.Tensor) -> dict[str, float]:
    kept, seen = counts[: len(layers)].tolist(), counts[len(layers) :].tolist()
    return {
        f"kept_ratio/layer_{layer:02d}": k / s
        for layer, k, s in zip(layers, kept, seen, strict=True)
        if s
    }
