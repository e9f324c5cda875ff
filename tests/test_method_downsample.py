"""Downsampling (``downsample``): the processor gets each image at (w // k, h // k), bicubic, and
makes the tokens it makes of that image; the count at the downsampled V against torch's FLOP
counter; backends, caching, batching, families and flags."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from flash_attn_cpu import install
from flop_counting import prefill_flops
from method_checks import cli_refusal, eval_side_by_side
from PIL import Image
from tiny_models import random_image, save_checkpoint, tiny_model

from pmod_cli import apply_method, apply_pmod
from pmod_cli.cli import main
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.efficiency import count_flops
from pmod_cli.model import MethodError, make_method
from pmod_cli.model.presets import get_preset, shape_from_hf_config

QUESTIONS = ["what colour?", "describe the image in one word please"]
LAYOUTS = ["next", "onevision", "qwen2_5_vl", "qwen3_vl"]  # the processor's count follows the size


def build(layout: str, attn: str = "sdpa"):
    if layout.startswith("qwen"):
        return tiny_model(layout=layout, attn=attn)
    return tiny_model("qwen2" if layout == "onevision" else "llama", layout, attn=attn)


def images():
    return [random_image(150, 110, 0), random_image(100, 230, 1)]


def prompts(processor, count: int = 2):
    return [build_prompt(processor, question, 1) for question in QUESTIONS[:count]]


def placeholders(model, inputs) -> list[int]:
    vision = (inputs["input_ids"] == model.config.image_token_id) & inputs["attention_mask"].bool()
    return vision.sum(dim=1).tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("factor", [2, 3])
def test_the_processor_gets_each_image_at_one_kth_of_its_sides(layout, factor):
    model, processor = build(layout)
    processor.tokenizer.padding_side = "left"
    full = encode(processor, prompts(processor), images(), model)
    apply_method(model, f"downsample:factor={factor}")
    small = encode(processor, prompts(processor), images(), model)
    resized = [
        image.resize((image.width // factor, image.height // factor), Image.BICUBIC)
        for image in images()
    ]
    reference = processor(
        text=prompts(processor), images=resized, padding=True, return_tensors="pt"
    )
    assert placeholders(model, small) == placeholders(model, reference)
    assert sum(placeholders(model, small)) < sum(placeholders(model, full))
    assert torch.equal(small["pixel_values"], reference["pixel_values"])


def test_the_largest_layout_downsampled_is_what_the_processor_makes_of_it():
    """``vision_layout`` (what ``pmod flops`` counts with no V given): LLaVA-NeXT's largest grid
    image at 1/k per side, and Qwen-VL's max_pixels image, against the processors."""
    next_model, next_processor = build("next")
    shape = shape_from_hf_config(next_model.config)
    height, width = 112, 112  # the tiny models' largest pinpoint
    for factor in (1, 2, 3):
        small = random_image(width // factor, height // factor, 0)
        made = next_processor(
            text=[prompts(next_processor, 1)[0]], images=[small], return_tensors="pt"
        )
        crops = made["pixel_values"].shape[1]
        tokens = placeholders(next_model, made)[0]
        assert make_method("downsample", factor=factor).vision_layout(shape) == (tokens, crops)
    qwen, qwen_processor = build("qwen2_5_vl")
    side = 112  # 16 merged tokens: the tiny processor's pixel limit
    shape = dataclasses.replace(
        shape_from_hf_config(qwen.config),
        max_pixels=qwen_processor.image_processor.size.longest_edge,
    )
    for factor in (1, 2):  # (at 1/4 the 28 px image is below the processor's lower limit)
        made = qwen_processor(
            text=[prompts(qwen_processor, 1)[0]],
            images=[random_image(side // factor, side // factor, 0)],
            return_tensors="pt",
        )
        expected = placeholders(qwen, made)[0]
        assert make_method("downsample", factor=factor).vision_layout(shape) == (expected, 1)


def test_presets_count_fewer_tokens_downsampled():
    method = make_method("downsample")
    assert method.vision_layout(get_preset("qwen2.5-vl-7b")) == (16384 // 4, 1)
    # 672 x 672 at 1/2 is 336 x 336: anyres picks the 336 x 672 grid, unpadded to 24 x 25 rows
    assert method.vision_layout(get_preset("llava-next-7b")) == (576 + 24 * 25, 3)


def test_the_count_equals_the_flop_counter_on_a_real_prefill():
    """The language model on the downsampled image's tokens is the dense count at that V."""
    model, processor = build("next", attn="eager")
    apply_method(model, "downsample")
    inputs = encode(processor, prompts(processor, 1), images()[:1], model)
    vision = placeholders(model, inputs)[0]
    linear = prefill_flops(model, inputs).linear
    shape = shape_from_hf_config(model.config)
    counted = count_flops(
        shape,
        model.retention_ratios,
        vision_tokens=vision,
        text_tokens=inputs["input_ids"].shape[1] - vision,
        dtype="fp32",
        method=model.token_method,
    )
    assert linear == counted.flops


GENERATE = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)


def assert_same_generation(first, second, sample: int = 0, row: int = 0):
    new = GENERATE["max_new_tokens"]
    assert torch.equal(first.sequences[row, -new:], second.sequences[sample, -new:])
    for a, b in zip(first.logits, second.logits, strict=True):
        assert torch.allclose(a[row], b[sample], atol=1e-4)


def test_every_attention_backend_answers_alike(monkeypatch):
    calls = install(monkeypatch)
    eager, processor = build("next", attn="eager")
    apply_method(eager, "downsample")
    processor.tokenizer.padding_side = "left"
    inputs = encode(processor, prompts(processor), images(), eager)
    with torch.no_grad():
        reference = eager.generate(**inputs, **GENERATE)
    for attn in ("sdpa", "flash_attention_2"):
        other = copy.deepcopy(eager)
        other.set_attn_implementation(attn)
        with torch.no_grad():
            result = other.generate(**inputs, **GENERATE)
        for sample in range(2):
            assert_same_generation(result, reference, sample, sample)
    assert calls["flash_attn_varlen_func"] + calls["flash_attn_func"] > 0


@pytest.mark.parametrize("layout", ["next", "qwen2_5_vl"])
def test_cached_equals_uncached_and_alone_equals_batched(layout):
    model, processor = build(layout)
    apply_method(model, "downsample")
    processor.tokenizer.padding_side = "left"
    batch = encode(processor, prompts(processor), images(), model)
    with torch.no_grad():
        cached = model.generate(**batch, **GENERATE)
        uncached = model.generate(**batch, **GENERATE, use_cache=False)
    for sample in range(2):
        assert_same_generation(uncached, cached, sample, sample)
        alone = encode(processor, [prompts(processor)[sample]], [images()[sample]], model)
        with torch.no_grad():
            assert_same_generation(model.generate(**alone, **GENERATE), cached, sample)


def test_llava_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    model, processor = tiny_model("llama", "llava")
    with pytest.raises(MethodError, match="downsample changes no token count on LLaVA-1.5"):
        apply_method(model, "downsample")
    save_checkpoint(model, processor, tmp_path / "llava")
    command = [
        "eval",
        str(tmp_path / "llava"),
        "--tasks",
        "pmod_tiny_vqa",
        "--method",
        "downsample",
    ]
    err = cli_refusal(monkeypatch, capsys, *command)
    assert "downsample changes no token count on LLaVA-1.5" in err, err


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--method", "downsample:factor=0"], "factor k must be an integer of at least 1, got 0"),
        (["--method", "downsample:factor=1.5"], "downsample's option factor takes int, got '1.5'"),
        (["--method", "downsample", "--match-tflops"], "--match-tflops solves a method's knob"),
        (["--method", "downsample:factor=2"], "downsample changes no token count on LLaVA-1.5"),
    ],
)
def test_bad_settings_end_in_one_error_line(monkeypatch, capsys, arguments, message):
    model = "llava-1.5-7b" if arguments[-1] == "downsample:factor=2" else "qwen2.5-vl-7b"
    monkeypatch.setattr("sys.argv", ["pmod", "flops", "--model", model, *arguments])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err, err


@pytest.mark.slow
def test_pmod_eval_runs_downsample_side_by_side(tmp_path):
    model, processor = build("qwen2_5_vl")
    apply_pmod(model, beta=0.5)
    checkpoint = save_checkpoint(model, processor, tmp_path / "qwen")
    runs, _ = eval_side_by_side(checkpoint, tmp_path / "eval.json", "dense,downsample:factor=2")
    assert (
        list(runs) == ["dense", "downsample"]
        and runs["downsample"]["label"] == "qwen: downsample 1/2"
    )
    dense, small = runs["dense"]["efficiency"], runs["downsample"]["efficiency"]
    # the tiny images (112 to 224 px, up to the processor's 16 tokens) make fewer at half size
    assert small["mean_vision_tokens"] < dense["mean_vision_tokens"]
    assert small["tflops"] < dense["tflops"]
