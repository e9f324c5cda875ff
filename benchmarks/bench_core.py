"""p-MoD against its dense twin, measured in one run: prefill, a training step, KV cache, peak memory.

    python benchmarks/bench_core.py --preset cpu            # ~1000 vision tokens, hidden 512, 16 layers
    python benchmarks/bench_core.py --preset video          # LLaVA-OneVision, 16 frames = 4097 vision tokens
    python benchmarks/bench_core.py --preset gpu            # LLaVA-NeXT-7B shape, bf16 (needs a GPU)
    python benchmarks/bench_core.py --preset smoke          # toy size: does it run at all

One random-weight LLaVA model (``video``: LLaVA-OneVision, whose frames are pooled 2x2 as the model
does) is built, a deep copy is converted with ``apply_pmod`` (beta 0.5 by default), and both run the
same inputs, after a warm-up. Next to the measured ratios it prints the FLOPs ratio ``pmod flops``
counts for the same prefill (paper count, and full count with causal attention). Times are the best of ``--repeats`` rounds in which dense and p-MoD alternate. Peak memory of a training step is the CUDA allocator's peak on GPU; on CPU, which has no
allocator statistics, it is the activation memory the step saves for backward. Prints a table and, with ``--json``, one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass

import torch

from pmod_cli import apply_pmod
from pmod_cli.efficiency.flops import count_flops_for_model
from pmod_cli.model import get_family, kv_cache_bytes
from pmod_cli.model.families.tiny import TinySpec


@dataclass
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    grid: int  # vision tokens = grid * grid
    text_tokens: int
    dtype: torch.dtype
    device: str
    repeats: int
    frames: int = 0  # > 0: a LLaVA-OneVision video of this many frames instead of one image

    @property
    def vision_tokens(self) -> int:
        if (
            self.frames
        ):  # each frame's grid x grid patches pooled to ceil(grid / 2) per side, one newline
            return self.frames * (-(-self.grid // 2)) ** 2 + 1
        return self.grid * self.grid


PRESETS = {
    # CPU: about 1000 vision tokens, hidden 512, 16 layers. Vocabulary 2048 keeps the LM head
    # (which p-MoD leaves alone) at the share of the FLOPs it has in a 7B model, about 2 %; with
    # 32000 words at hidden 512 it would be 24 % and the benchmark would mostly time the head.
    "cpu": Preset(512, 1376, 16, 8, 8, 2048, 32, 58, torch.float32, "cpu", 5),
    # LLaVA-NeXT-7B shape: 32 layers, hidden 4096; 54 x 54 = 2916 vision tokens (the paper's 2928
    # is no square grid: within 0.5 %)
    "gpu": Preset(4096, 11008, 32, 32, 32, 32000, 54, 58, torch.bfloat16, "cuda", 10),
    # the CPU language model under a 16-frame video: 448 px frames of 32 x 32 patches, pooled to
    # 16 x 16 = 256 tokens each, 4097 vision tokens in all (a Qwen2 decoder, as OneVision's)
    "video": Preset(512, 1376, 16, 8, 8, 2048, 32, 58, torch.float32, "cpu", 3, frames=16),
    # a few seconds on any CPU: checks that the benchmark runs (gpu_check's own test), times nothing
    "smoke": Preset(64, 128, 4, 4, 2, 256, 4, 16, torch.float32, "cpu", 1),
}


def build_dense(preset: Preset, frames: int = 0, vision_layers: int = 1):
    """The dense model: LLaVA-1.5 (a CLIP-style tower) for an image, LLaVA-OneVision (SigLIP-style,
    a Qwen2 decoder) for a video, built by the family's tiny builder at the preset's size, with a
    tower of ``vision_layers`` layers."""
    family = get_family("llava_onevision" if frames else "llava")
    spec = TinySpec(
        text_model="qwen2" if frames else "llama",
        layers=preset.layers,
        hidden=preset.hidden,
        intermediate=preset.intermediate,
        heads=preset.heads,
        kv_heads=preset.kv_heads,
        max_positions=8192,
        vision_layers=vision_layers,
        vision_hidden=64,
        vision_intermediate=128,
        image_size=14 * preset.grid,
        feature_layer=-1 if frames else -2,
        attn="sdpa",
    )
    media = {"image_token_id": preset.vocab - 1}
    if frames:
        media["video_token_id"] = preset.vocab - 2
    with torch.device(preset.device):
        return family.tiny_model(spec, preset.vocab, media).to(preset.dtype)


def make_video_inputs(preset: Preset) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    half = preset.text_tokens // 2
    text = torch.randint(0, preset.vocab - 2, (preset.text_tokens,), generator=generator)
    video = torch.full((preset.vision_tokens,), preset.vocab - 2)
    input_ids = torch.cat([text[:half], video, text[half:]])[None].to(preset.device)
    size = 14 * preset.grid
    pixels = torch.randn(1, preset.frames, 3, size, size, generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": pixels.to(preset.device, preset.dtype),
        "labels": input_ids.masked_fill(input_ids >= preset.vocab - 2, -100),
    }


def make_inputs(preset: Preset, vision_tokens: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    half = preset.text_tokens // 2
    text = torch.randint(0, preset.vocab - 2, (preset.text_tokens,), generator=generator)
    image = torch.full((vision_tokens,), preset.vocab - 1)
    input_ids = torch.cat([text[:half], image, text[half:]])[None].to(preset.device)
    pixel_values = torch.randn(1, 3, 14 * preset.grid, 14 * preset.grid, generator=generator)
    labels = input_ids.masked_fill(input_ids == preset.vocab - 1, -100)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values.to(preset.device, preset.dtype),
        "labels": labels,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved_best(fns: dict, device: str, repeats: int) -> dict[str, float]:
    """Best time of each function over ``repeats`` rounds, the functions alternating within a round.

    Alternating makes dense and p-MoD share whatever else the machine is doing, and the best
    time is the least disturbed one (as ``timeit`` reports).
    """
    for fn in fns.values():  # warm-up
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], seconds(fn, device))
    return best


def measure(models: dict, inputs, preset: Preset) -> dict[str, dict[str, float]]:
    prefill_inputs = {k: v for k, v in inputs.items() if k != "labels"}

    def prefill(model):
        with torch.no_grad():
            return model(**prefill_inputs, use_cache=True, logits_to_keep=1)

    def train_step(model):
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    results = {name: {} for name in models}
    for model in models.values():
        model.eval()
    for name, best in interleaved_best(
        {name: (lambda m=model: prefill(m)) for name, model in models.items()},
        preset.device,
        preset.repeats,
    ).items():
        results[name]["prefill_s"] = best
    for name, model in models.items():
        output = prefill(model)
        results[name]["kv_cache_bytes"] = kv_cache_bytes(
            output["cache"] if "cache" in output else output["past_key_values"]
        )
        model.train()
    for name, best in interleaved_best(
        {name: (lambda m=model: train_step(m)) for name, model in models.items()},
        preset.device,
        preset.repeats,
    ).items():
        results[name]["train_step_s"] = best
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return results


def activation_bytes(model, inputs) -> int:
    """Bytes of the tensors a training step saves for backward (distinct storages): its peak activations."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**inputs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def peak_memory_bytes(model, inputs, device: str) -> int:
    """GPU: the allocator's peak during a training step; CPU: the activations it saves for backward."""
    if device != "cuda":
        return activation_bytes(model, inputs)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model(**inputs).loss.backward()
    peak = torch.cuda.max_memory_allocated() - start
    model.zero_grad(set_to_none=True)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.repeats:
        preset.repeats = args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    vision_tokens = preset.vision_tokens

    dense = build_dense(preset, preset.frames)
    pmod = apply_pmod(copy.deepcopy(dense), beta=args.beta)
    inputs = make_video_inputs(preset) if preset.frames else make_inputs(preset, vision_tokens)

    results = measure({"dense": dense, "pmod": pmod}, inputs, preset)
    for name, model in (("dense", dense), ("pmod", pmod)):
        results[name]["peak_memory_bytes"] = peak_memory_bytes(model, inputs, preset.device)
    ratios = {key: results["pmod"][key] / results["dense"][key] for key in results["dense"]}
    media = {"video_frames": preset.frames} if preset.frames else {"vision_tokens": vision_tokens}
    counted = {
        count: count_flops_for_model(
            pmod, text_tokens=preset.text_tokens, count=count, **media
        ).ratio
        for count in ("paper", "full")
    }
    report = {
        "preset": args.preset,
        "beta": args.beta,
        "vision_tokens": vision_tokens,
        "text_tokens": preset.text_tokens,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if preset.device == "cuda" else "cpu",
        "frames": preset.frames,
        "mod_layers": sum(r < 1 for r in pmod.retention_ratios),
        "flops_ratio": counted,  # pmod flops' count of this prefill: paper and full (causal attention)
        "dense": results["dense"],
        "pmod": results["pmod"],
        "pmod_over_dense": ratios,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"p-MoD (beta {args.beta}) vs dense, preset {args.preset}, {report['device']}"
    )
    for column in ("metric", "dense", "p-MoD", "p-MoD / dense"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in results["dense"]:
        fmt = (
            (lambda v: f"{v * 1000:.1f} ms")
            if key.endswith("_s")
            else (lambda v: f"{v / 2**20:.1f} MiB")
        )
        table.add_row(
            key, fmt(results["dense"][key]), fmt(results["pmod"][key]), f"{ratios[key]:.3f}"
        )
    Console().print(table)
    print(
        f"FLOPs p-MoD / dense (pmod flops): paper count {counted['paper']:.3f}, full count {counted['full']:.3f}"
    )


if __name__ == "__main__":
    main()
