"""LLaVA-OneVision's own rules: image token counts (anyres_max_9), which vision token belongs to which
image or video frame, and the per-image budget, on a padded batch that mixes one image, two images
and a short video. The equivalences every family passes are in test_conformance.py."""

from __future__ import annotations

import pytest
import torch
from test_conformance import group_sizes
from tiny_models import (
    OV_GRID_PINPOINTS,
    random_image,
    random_video,
    randomize_routers,
    tiny_model,
    tiny_onevision,
)

from pmod_cli import PMoDConfig, apply_pmod, record_routing
from pmod_cli.model import kept_count
from pmod_cli.model.families import get_family
from pmod_cli.model.families.llava_onevision import image_token_counts

PROMPTS = [
    "USER: <image>\nwhat colour? ASSISTANT:",
    "USER: <image><image>\ndescribe the two images please ASSISTANT:",  # two image runs that touch
    "USER: <video>\nwhat happens? ASSISTANT:",
]


def batch_inputs(processor, indices=(0, 1, 2)):
    """One image, two images, a 3-frame video: left-padded, as the processor makes them."""
    images = [[random_image(60, 40, 0)], [random_image(40, 90, 1), random_image(200, 190, 2)], []]
    chosen_images = [images[i] for i in indices if images[i]]
    videos = [random_video(3, 50, 70, 3)] if 2 in indices else None
    return processor(
        text=[PROMPTS[i] for i in indices],
        images=chosen_images or None,
        videos=videos,
        return_tensors="pt",
        padding=True,
    )


def pmod_model(text="qwen2", **overrides):
    model, processor = tiny_onevision(text)
    apply_pmod(model, **overrides)
    randomize_routers(model)
    return model, processor


# ---- which vision token belongs to which image or frame -----------------------------------


@pytest.mark.parametrize(
    "size", [(60, 40), (40, 90), (200, 190), (56, 56), (300, 20), (17, 230), (224, 224), (500, 480)]
)
def test_image_token_counts_follow_the_processor(size):
    """One image alone is anyres_max_9 (the 224 px grid of 16 x 16 features is shrunk to 12 x 12)."""
    model, processor = tiny_onevision(layers=1)
    width, height = size
    inputs = processor(
        text=["<image>"], images=[random_image(width, height, 0)], return_tensors="pt"
    )
    expected = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_token_counts(model.config, inputs["image_sizes"], inputs["batch_num_images"]) == [
        expected
    ]


def test_vision_groups_split_touching_images_and_every_frame():
    model, processor = tiny_onevision(layers=1)
    family = get_family("llava_onevision")
    inputs = batch_inputs(processor)
    groups = family.vision_groups(inputs["input_ids"], model.config, inputs)
    vision = family.vision_mask(inputs["input_ids"], model.config)
    assert torch.equal(groups >= 0, vision)
    one_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert list(group_sizes(groups[0]).values()) == [one_image]
    # "<image><image>": one run of 2 x 17 tokens, two groups (16 features + a newline each)
    assert list(group_sizes(groups[1]).values()) == [17, 17]
    # 3 frames of 2 x 2 pooled features; the closing newline goes with the last frame
    assert list(group_sizes(groups[2]).values()) == [4, 4, 5]
    ids = [set(group_sizes(groups[row])) for row in range(3)]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])


def test_image_and_video_tokens_compete_for_one_budget_per_sample():
    model, processor = pmod_model(ratios=[1.0, 0.5, 0.3, 1.0])
    inputs = processor(
        text=["USER: <image> and <video>\nsame? ASSISTANT:"],
        images=[[random_image(64, 64, 4)]],
        videos=[random_video(3, 56, 56, 5)],
        return_tensors="pt",
    )
    image = inputs["input_ids"][0] == model.config.image_token_id
    video = inputs["input_ids"][0] == model.config.video_token_id
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
    for decision in routing.layers.values():
        keep, logits = decision.keep_mask[0], decision.logits[0]
        assert torch.equal(decision.vision_mask[0], image | video)
        assert int((keep & (image | video)).sum()) == kept_count(
            int((image | video).sum()), decision.ratio
        )
        kept_scores = logits[keep & (image | video)]
        assert kept_scores.min() >= logits[~keep & (image | video)].max()


@pytest.mark.parametrize("layout", ["llava", "llava_next"])
def test_per_image_budget_for_the_llava_families(layout):
    model, processor = tiny_model("qwen2", layout)
    apply_pmod(model, ratios=[1.0, 0.5, 0.3, 1.0], budget="image")
    randomize_routers(model)
    prompts = ["USER: <image><image>\ntwo? ASSISTANT:", "USER: <image>\none? ASSISTANT:"]
    images = [random_image(60, 40, 0), random_image(40, 90, 1), random_image(70, 70, 2)]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    family = get_family(layout)
    groups = family.vision_groups(inputs["input_ids"], model.config, inputs)
    per_image = [
        processor(text=["<image>"], images=[image], return_tensors="pt")["input_ids"]
        for image in images
    ]
    expected = [int((ids == model.config.image_token_id).sum()) for ids in per_image]
    assert list(group_sizes(groups[0]).values()) + list(group_sizes(groups[1]).values()) == expected
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
    for decision in routing.layers.values():
        for sample in range(2):
            for group, size in group_sizes(groups[sample]).items():
                kept = decision.keep_mask[sample] & (groups[sample] == group)
                assert int(kept.sum()) == kept_count(size, decision.ratio)


def test_per_image_budget_needs_vision_routing_and_its_groups():
    with pytest.raises(ValueError, match="routed_tokens"):
        PMoDConfig(budget="image", routed_tokens="all")
    # the per-image budget ranks raw scores; the released code's weight rule has no such budget
    with pytest.raises(ValueError, match="selection"):
        PMoDConfig(budget="image", selection="weight")
    model, processor = pmod_model(ratios=[0.5, 1.0, 1.0, 1.0], budget="image")
    inputs = batch_inputs(processor, (0,))
    vision_mask = inputs["input_ids"] == model.config.image_token_id
    embeddings = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(RuntimeError, match="no vision groups"):
        model(
            inputs_embeds=embeddings,
            attention_mask=inputs["attention_mask"],
            vision_mask=vision_mask,
        )


def test_grid_pinpoints_cover_the_anyres_max_9_shrink():
    # the 224 px grid is 16 x 16 features: more than 9 crops of 4 x 4 by over 10 %, so it is shrunk
    assert [224, 224] in OV_GRID_PINPOINTS
    model, _ = tiny_onevision(layers=1)
    sizes = torch.tensor([[224, 224]])
    assert image_token_counts(model.config, sizes, None) == [16 + 12 * 13]
