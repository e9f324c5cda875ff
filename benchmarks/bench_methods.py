"""Every registered method against the dense model at p-MoD's TFLOPs, measured in one run: prefill.

    python benchmarks/bench_methods.py --preset cpu --threads 2     # ~1000 vision tokens, hidden 512, 16 layers
    python benchmarks/bench_methods.py --preset gpu                 # LLaVA-NeXT-7B shape, bf16 (needs a GPU)
    python benchmarks/bench_methods.py --preset smoke               # toy size: does it run at all

One random-weight LLaVA-1.5 model (bench_core's shape, with a two-layer CLIP-style tower so that
VisionZip has a feature layer to rank with) is copied once per method. p-MoD runs at beta 0.5; every
method with a knob is solved to p-MoD's paper-count TFLOPs (``match_method``, as ``--match-tflops``
does), the others run at their defaults. All models take the same prompt (a method that shortens
it gets its own placeholders), alternating within each round; each keeps its best prefill. For each
method it prints the prefill time over dense next to the FLOPs share ``pmod flops`` counts for the
same prefill, and the overhead = time ratio / FLOPs share (1.0: the method runs at its FLOPs bound).
A method the model's family cannot run is listed with its refusal.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import torch
from bench_core import PRESETS, Preset, build_dense, interleaved_best, make_inputs

from pmod_cli import apply_method, apply_pmod
from pmod_cli.efficiency.flops import count_flops_for_model, match_method
from pmod_cli.model.methods import MethodError, cut_image_placeholders, method_names, parse_method
from pmod_cli.model.presets import shape_from_hf_config


def method_models(dense, pmod, preset: Preset, specs: list[str]) -> tuple[dict, dict]:
    """(name -> model running that method on dense's weights, name -> refusal line)."""
    vision, text = preset.vision_tokens, preset.text_tokens
    shape = shape_from_hf_config(pmod.config)
    target = count_flops_for_model(pmod, vision_tokens=vision, text_tokens=text).flops
    models, refused = {"dense": dense, "pmod": pmod}, {}
    for spec in specs:
        method = parse_method(spec)
        try:
            method = match_method(
                shape,
                pmod.retention_ratios,
                method,
                target,
                vision_tokens=vision,
                text_tokens=text,
                dtype=str(preset.dtype).removeprefix("torch."),
            )
            models[method.name] = apply_method(copy.deepcopy(dense), method, pmod=pmod.pmod_config)
        except MethodError as err:
            refused[method.name] = str(err)
    return models, refused


def inputs_for(model, inputs: dict, preset: Preset) -> dict:
    """The prompt as ``model``'s method takes it: its placeholders per image, if it sets them."""
    method = getattr(model, "token_method", None)  # None: the dense HF model
    per_image = method.prompt_tokens_per_image() if method is not None else None
    if per_image is None:
        return inputs
    return cut_image_placeholders(inputs, preset.vocab - 1, per_image, 0, "left")


def run(preset: Preset, beta: float, specs: list[str]) -> dict:
    dense = build_dense(preset, vision_layers=2).eval()  # VisionZip ranks at layer -2
    pmod = apply_pmod(copy.deepcopy(dense), beta=beta).eval()
    models, refused = method_models(dense, pmod, preset, specs)
    base = {k: v for k, v in make_inputs(preset, preset.vision_tokens).items() if k != "labels"}
    prompts = {name: inputs_for(model, base, preset) for name, model in models.items()}

    def prefill(name):
        with torch.no_grad():
            return models[name](**prompts[name], use_cache=True, logits_to_keep=1)

    best = interleaved_best(
        {name: (lambda n=name: prefill(n)) for name in models}, preset.device, preset.repeats
    )
    tokens = dict(vision_tokens=preset.vision_tokens, text_tokens=preset.text_tokens)
    dense_flops = count_flops_for_model(pmod, **tokens).baseline_flops  # dense, same prompt
    rows = {}
    for name, model in models.items():
        counted = model is not dense
        share = count_flops_for_model(model, **tokens).flops / dense_flops if counted else 1.0
        ratio = best[name] / best["dense"]
        rows[name] = {
            "label": model.token_method.label if counted else "dense",
            "prefill_s": best[name],
            "time_ratio": ratio,
            "flops_share": share,
            "overhead": ratio / share,
        }
    return {"rows": rows, "refused": refused}


def print_table(preset_name: str, preset: Preset, result: dict) -> None:
    print(
        f"preset {preset_name}: V={preset.vision_tokens} + T={preset.text_tokens} tokens, hidden "
        f"{preset.hidden}, {preset.layers} layers, {str(preset.dtype).removeprefix('torch.')}, "
        f"best of {preset.repeats}"
    )
    print(
        f"{'method':<34} {'prefill':>10} {'time / dense':>13} {'FLOPs share':>12} {'overhead':>9}"
    )
    for row in result["rows"].values():
        print(
            f"{row['label']:<34} {row['prefill_s'] * 1000:>8.1f}ms {row['time_ratio']:>13.3f} "
            f"{row['flops_share']:>12.3f} {row['overhead']:>9.3f}"
        )
    for name, reason in result["refused"].items():
        print(f"{name:<34} refused: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help="a --method spec to run (repeatable); default: every registered method",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.preset == "video":
        parser.error("--preset video is bench_core's; methods run on an image")
    preset = PRESETS[args.preset]
    if args.repeats is not None:
        preset = dataclasses.replace(preset, repeats=args.repeats)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    specs = args.method or [name for name in method_names() if name not in ("pmod", "dense")]
    result = run(preset, args.beta, specs)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(args.preset, preset, result)


if __name__ == "__main__":
    main()
