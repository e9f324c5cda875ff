"""The commands on Qwen2.5-VL / Qwen3-VL checkpoints: `pmod visualize`'s token boxes, `pmod flops`
presets, the recipes' plans and the training encoder against the processor. Eval, convert and arank
run for every video family in test_family_commands.py; the baselines and the FLOP counter check
for every family in test_conformance.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import (
    QWEN_VIDEO,
    random_image,
    random_video,
    randomize_routers,
    save_checkpoint,
    tiny_qwen_vl,
)
from transformers import AutoModelForImageTextToText
from typer.testing import CliRunner

from pmod_cli import PMoDConfig, apply_pmod
from pmod_cli.cli import app
from pmod_cli.data.llava_data import Collator, SampleEncoder
from pmod_cli.data.prompts import build_prompt
from pmod_cli.data.templates import get_template
from pmod_cli.efficiency.flops import count_flops
from pmod_cli.errors import UserError
from pmod_cli.model import retention_ratios
from pmod_cli.model.families import get_family
from pmod_cli.model.loading import load_checkpoint
from pmod_cli.model.presets import get_preset, read_model_shape, shape_from_hf_config
from pmod_cli.training.build import part_of
from pmod_cli.training.plan import make_training_plan
from pmod_cli.training.recipe import load_recipe
from pmod_cli.visualization.selection import select_tokens

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def checkpoints(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model, processor = tiny_qwen_vl(name)
    # as a trained checkpoint saves it: 4 frames a video, spread by pmod
    get_family(name).set_video_frames(processor.video_processor, 4)
    dense = save_checkpoint(model, processor, root / "dense")
    apply_pmod(model, PMoDConfig(beta=0.5))  # 4 layers: ratios 1, 0.75, 0.25, 0.15
    randomize_routers(model)
    pmod = save_checkpoint(model, processor, root / "pmod")
    return {"dense": dense, "pmod": pmod, "name": name}


# ---- shapes and FLOPs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,layers,billions",
    [
        ("qwen2.5-vl-3b", 36, 3.754622976),
        ("qwen2.5-vl-7b", 28, 8.292166656),
        ("qwen3-vl-4b", 36, 4.437815808),
        ("qwen3-vl-8b", 36, 8.767123696),
    ],
)
def test_presets_build_the_released_models(name, layers, billions):
    """The HF model built from each preset has the released checkpoint's parameter count."""
    shape = get_preset(name)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(shape.to_hf_config())
    assert type(model) is shape.family.dense_model_class and shape.text.num_layers == layers
    assert sum(p.numel() for p in model.parameters()) == round(billions * 1e9)
    read_back = shape_from_hf_config(model.config)
    assert read_back.vision == shape.vision and read_back.text == shape.text
    # an image at the processor's max_pixels: max_pixels / (patch * merge)^2 merged tokens
    factor = shape.vision.patch_size * shape.vision.merge_size
    assert shape.vision_tokens == shape.max_pixels // factor**2 == 16384


def test_flops_count_a_qwen_video_and_the_vision_tower():
    result = CliRunner().invoke(
        app, ["flops", "--model", "qwen2.5-vl-7b", "--video-frames", "32", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    # 16 temporal patches of 2 frames, each at 768 tokens (28 x 28 px cells at 602112 pixels)
    assert plan["vision_tokens"] == 16 * 768 and plan["vision_crops"] == 16
    shape = get_preset("qwen3-vl-8b")
    full = count_flops(shape, retention_ratios(36, beta=0.5), count="full")
    # the Qwen3-VL tower runs 27 layers over 4 patches per token, and 1 + 3 DeepStack mergers
    assert full.components["vision_tower"] > 27 * 2 * 16384 * 4 * 4 * 1152**2
    merged = 1152 * 4
    assert full.components["projector"] == 4 * 2 * 16384 * (merged * merged + merged * 4096)


def test_a_checkpoint_counts_its_own_pixel_limits(checkpoints):
    shape = read_model_shape(checkpoints["pmod"])
    factor = 28 if checkpoints["name"] == "qwen2_5_vl" else 32
    assert shape.layout == checkpoints["name"] and shape.max_pixels == factor * factor * 16
    assert shape.vision_tokens == 16 and shape.pmod is not None


# ---- recipes and training ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe,preset,dense_layers,mod_layers",
    [("qwen2_5_vl.toml", "qwen2.5-vl-7b", 7, 21), ("qwen3_vl.toml", "qwen3-vl-8b", 9, 27)],
)
def test_dry_run_plans_the_qwen_recipes_from_their_presets(
    recipe, preset, dense_layers, mod_layers
):
    plan = make_training_plan("sft", load_recipe(RECIPES / recipe))
    assert f"preset {preset}" in plan.model_source and plan.shape.vision_tokens == 16384
    assert [r < 1 for r in plan.retention_ratios] == [False] * dense_layers + [True] * mod_layers
    hidden = get_preset(preset).text.hidden_size
    assert plan.parameters["router"] == (mod_layers * (hidden + 1),) * 2
    # sft freezes the ViT and trains its merger (the connector)
    assert plan.parameters["vision_tower"][0] == 0 and plan.parameters["vision_tower"][1] > 0
    assert plan.parameters["connector"][0] == plan.parameters["connector"][1] > 0
    assert not plan.data.found


def test_a_qwen_recipe_from_parts_is_refused_in_one_line():
    parts = [
        "model.checkpoint=",
        "model.vision_tower=tiny:base/vision_tower",
        "model.llm=tiny:base/llm",
    ]
    with pytest.raises(UserError, match="Qwen2.5-VL trains from a whole checkpoint"):
        load_recipe(RECIPES / "qwen2_5_vl_tiny.toml", parts)


def test_parts_of_a_qwen_model():
    assert part_of("model.visual.blocks.0.attn.qkv.weight") == "vision_tower"
    assert part_of("model.visual.merger.mlp.0.weight") == "connector"
    assert part_of("model.visual.deepstack_merger_list.1.norm.weight") == "connector"
    assert part_of("model.language_model.layers.3.router.weight") == "router"
    assert part_of("model.language_model.layers.3.mlp.up_proj.weight") == "llm"


@pytest.mark.parametrize("template", ["qwen_vl", "chat_template"])
@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_training_text_is_the_text_evaluation_prompts_with(name, template):
    """A training sample's ids (the template's rendering, vision tokens expanded inside their
    markers) and the collator's token types equal what the processor makes of the chat template's
    prompt and the answer: training and evaluation see the same tokens and 3-D positions."""
    _, processor = tiny_qwen_vl(name, layers=1)
    processor.chat_template = get_template("qwen_vl").jinja
    image = random_image(90, 50, 0)
    encoder = SampleEncoder(
        processor, template if template == "chat_template" else get_template(template), 512
    )
    conversation = [
        {"from": "human", "value": "<image>\nwhat colour?"},
        {"from": "gpt", "value": "red"},
    ]
    sample = encoder.encode(conversation, [image])
    batch = Collator(processor.tokenizer.pad_token_id, get_family(name).token_types(processor))(
        [
            {
                "input_ids": sample.input_ids,
                "labels": sample.labels,
                "vision_inputs": sample.vision_inputs,
            }
        ]
    )
    prompt = build_prompt(processor, "what colour?", 1)
    reference = processor(text=[prompt + "red<|im_end|>\n"], images=[image], return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["mm_token_type_ids"], reference["mm_token_type_ids"].int())
    assert torch.equal(batch["image_grid_thw"], reference["image_grid_thw"])
    answer = batch["labels"][0][batch["labels"][0] != -100]
    # the reply and its end-of-turn marker (a chat template's reply span also takes the newline)
    assert processor.tokenizer.decode(answer).removesuffix("\n") == "red<|im_end|>"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_sft_on_the_tiny_qwen_base(tmp_path, name):
    """The tiny recipe, a few steps on a small media set (images, image pairs, videos), from the
    tiny checkpoint; the result is a p-MoD Qwen-VL with trained
    routers and the qwen_vl template saved for evaluation."""
    from pmod_cli.data.media import generate
    from pmod_cli.training.stages import sft

    media = generate(tmp_path / "media", train_samples=6, heldout_samples=1)
    overrides = [
        f"data.path={media / 'sft_train.json'}",
        "data.video_frames=4",
        "train.max_steps=3",
        "train.global_batch_size=4",
        "train.per_device_batch_size=4",
        "train.logging_steps=1",
        f"train.output_dir={tmp_path / 'out'}",
        "pmod.budget=image",
    ]
    result = sft(load_recipe(RECIPES / f"{name}_tiny.toml", overrides))
    assert result.summary["steps"] == 3 and result.summary["flops_ratio"] < 1.0
    assert result.summary["skipped_samples"] == 0
    model, processor = load_checkpoint(tmp_path / "out", require_pmod=True)
    assert model.config.model_type == f"pmod_{name}" and model.pmod_config.budget == "image"
    assert model.config.text_config.model_type == f"{name}_text"
    # the last layer's vision tokens reach only their own (unlabelled) logits: its router gets no
    # gradient in sft; every earlier MoD layer's router has learned
    routers = [layer.router for layer in model.decoder_layers[:-1] if layer.is_mod]
    assert routers and all(router.weight.abs().sum() > 0 for router in routers)
    assert processor.chat_template == get_template("qwen_vl").jinja


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_training_text_of_a_video_is_the_processors(name):
    """A video sample's ids equal the processor's on the evaluation prompt: Qwen3-VL's timestamps
    and per-patch markers come from the processor's own replacement of the video token."""
    _, processor = tiny_qwen_vl(name, layers=1)
    processor.chat_template = get_template("qwen_vl").jinja
    video = random_video(4, 64, 96, 0)
    encoder = SampleEncoder(processor, get_template("qwen_vl"), max_length=512)
    conversation = [{"from": "human", "value": "<video>\nwhat?"}, {"from": "gpt", "value": "a"}]
    sample = encoder.encode(conversation, videos=[video])
    prompt = build_prompt(processor, "what?", 0, num_videos=1)
    reference = processor(text=[prompt + "a<|im_end|>\n"], videos=[video], return_tensors="pt")
    assert sample.input_ids.tolist() == reference["input_ids"][0].tolist()
    assert torch.equal(sample.vision_inputs["video_grid_thw"], reference["video_grid_thw"])
    if name == "qwen3_vl":  # a timestamp and markers before each temporal patch
        assert "seconds>" in processor.tokenizer.decode(sample.input_ids)


def test_a_trained_model_takes_the_frames_pmod_spreads_over_a_video():
    """pmod decodes data.video_frames frames itself; Qwen3-VL's video processor would sample them
    again at its fps (and refuses a frame count next to it): after set_video_frames, 8 frames
    make 4 temporal patches."""
    _, processor = tiny_qwen_vl("qwen3_vl", layers=1)
    get_family("qwen3_vl").set_video_frames(processor.video_processor, 8)
    inputs = processor(text=[QWEN_VIDEO], videos=[random_video(8, 64, 96, 0)])
    assert inputs["video_grid_thw"][0][0] == 4 and processor.video_processor.num_frames == 8


# ---- visualize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(60, 40), (200, 190), (17, 230)])
def test_visualize_boxes_cover_a_dynamic_resolution_image(checkpoints, size):
    model, processor = load_checkpoint(checkpoints["pmod"])
    width, height = size
    image = random_image(width, height, 1)
    selection = select_tokens(model, processor, image, "what is it?")
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image])
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert selection.num_vision == h * w // 4 == len(selection.boxes)
    # the cells tile the whole picture, row by row
    area = sum((box.x1 - box.x0) * (box.y1 - box.y0) for box in selection.boxes)
    assert area == pytest.approx(width * height)
    assert selection.boxes[-1].x1 == pytest.approx(width)
    assert selection.boxes[-1].y1 == pytest.approx(height)


def test_visualize_boxes_of_a_video_follow_its_temporal_patches(checkpoints):
    model, processor = load_checkpoint(checkpoints["pmod"])
    video = random_video(4, 96, 64, 2)
    selection = select_tokens(model, processor, [], "what happens?", video=video)
    inputs = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[video])
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == 2 and selection.num_vision == t * h * w // 4 == len(selection.boxes)
    # one set of cells per 2 frames, tagged with the pair's first frame
    assert [box.source for box in selection.boxes] == [0] * (h * w // 4) + [2] * (h * w // 4)
