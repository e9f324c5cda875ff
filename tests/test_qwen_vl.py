"""Qwen2.5-VL's and Qwen3-VL's own rules, on a left-padded batch mixing images of different
resolutions (different token counts) and a short video: vision groups are images and temporal
patches, a generated vision token is text, kept tokens keep their original 3-D (M-RoPE) positions,
and Qwen3-VL's DeepStack features land on every vision token, kept or skipped. The equivalences
every family passes are in test_conformance.py."""

from __future__ import annotations

import copy

import pytest
import torch
from test_conformance import group_sizes
from tiny_models import (
    QWEN_IMAGE,
    QWEN_VIDEO,
    random_image,
    random_video,
    randomize_routers,
    tiny_qwen_vl,
)

from pmod_cli import apply_pmod, record_routing
from pmod_cli.model.families import get_family

FAMILY_NAMES = ["qwen2_5_vl", "qwen3_vl"]
LAYER0_MOD = [0.5, 1.0, 0.3, 0.6]  # layer 0 routes (and, in Qwen3-VL, receives DeepStack features)
PROMPTS = [
    f"user: {QWEN_IMAGE} what colour? assistant:",
    f"user: {QWEN_IMAGE}{QWEN_IMAGE} describe the two images please assistant:",
    f"user: {QWEN_VIDEO} what happens? assistant:",
]


def batch_inputs(processor, indices=(0, 1, 2)):
    """One small image, two images of other sizes, a 4-frame video: left-padded."""
    images = [[random_image(60, 40, 0)], [random_image(40, 90, 1), random_image(200, 190, 2)], []]
    chosen = [image for i in indices for image in images[i]]
    videos = [random_video(4, 64, 96, 3)] if 2 in indices else None
    return processor(
        text=[PROMPTS[i] for i in indices],
        images=chosen or None,
        videos=videos,
        return_tensors="pt",
        padding=True,
    )


def pmod_model(name, **overrides):
    model, processor = tiny_qwen_vl(name)
    apply_pmod(model, **overrides)
    randomize_routers(model)
    return model, processor


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_batch_mixes_resolutions_and_a_video(name):
    model, processor = tiny_qwen_vl(name, layers=1)
    inputs = batch_inputs(processor)
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    video_tokens = (inputs["input_ids"] == model.config.video_token_id).sum(dim=1).tolist()
    per_image = (inputs["image_grid_thw"].prod(dim=1) // 4).tolist()
    assert len(set(per_image)) == 3  # three images, three different token counts
    assert image_tokens == [per_image[0], per_image[1] + per_image[2], 0]
    assert video_tokens[:2] == [0, 0] and video_tokens[2] >= 4
    assert inputs["attention_mask"].min() == 0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_generated_vision_token_is_text(name):
    """A model that generates a vision token's id (random weights here) routes it as text: it has
    no vision features; a MoD layer would otherwise keep none of a decoding step's tokens."""
    model, processor = pmod_model(name, ratios=LAYER0_MOD)
    video_pad = model.config.video_token_id
    kwargs = dict(do_sample=False, max_new_tokens=3, sequence_bias={(video_pad,): 100.0})
    for indices in ((0,), (0, 1, 2)):
        inputs = batch_inputs(processor, indices)
        if len(indices) == 1:  # no attention mask: the cache says where the step sits
            inputs.pop("attention_mask")
        with torch.no_grad(), record_routing(model) as routing:
            sequences = model.generate(**inputs, **kwargs)
        assert (sequences[:, -3:] == video_pad).all()  # every step picked <|video_pad|>
        decoding_steps = routing.calls[1:]
        assert len(decoding_steps) == 2
        for step in decoding_steps:
            for decision in step.values():
                assert not decision.vision_mask.any() and decision.keep_mask.all()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_vision_groups_are_images_and_temporal_patches(name):
    model, processor = tiny_qwen_vl(name, layers=1)
    family = get_family(name)
    inputs = batch_inputs(processor)
    groups = family.vision_groups(inputs["input_ids"], model.config, inputs)
    assert torch.equal(groups >= 0, family.vision_mask(inputs["input_ids"], model.config))
    per_image = (inputs["image_grid_thw"].prod(dim=1) // 4).tolist()
    assert list(group_sizes(groups[0]).values()) == per_image[:1]
    assert list(group_sizes(groups[1]).values()) == per_image[1:]  # two touching images
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert list(group_sizes(groups[2]).values()) == [h * w // 4] * t  # two frames each


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_mod_layer_equals_the_hf_layer_on_the_kept_tokens_at_their_3d_positions(name):
    """A MoD layer with a zero router (w = 1) gives, on its kept tokens, what the untouched HF
    decoder layer gives on those tokens alone with the rotary embedding of their ORIGINAL 3-D
    positions; skipped tokens pass through unchanged."""
    model, processor = tiny_qwen_vl(name)
    untouched = copy.deepcopy(model.model.language_model.layers[1])
    apply_pmod(model, ratios=[1.0, 0.5, 1.0, 1.0])
    layer = model.model.language_model.layers[1]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.zero_()
    inputs = batch_inputs(processor)
    captured = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: captured.update(entering=args[0])),
        layer.register_forward_hook(lambda m, args, out: captured.update(leaving=out)),
    ]
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
    for hook in hooks:
        hook.remove()
    keep = routing.layers[1].keep_mask
    valid = inputs["attention_mask"].bool()
    # the positions the model itself gives the full sequence: (3, batch, seq)
    grid_inputs = {
        key: inputs[key]
        for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        if key in inputs
    }
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        attention_mask=inputs["attention_mask"],
        **grid_inputs,
    )
    # kept vision tokens' temporal, height and width positions differ: truly 3-D
    assert not torch.equal(positions[0][keep], positions[1][keep])
    assert not torch.equal(positions[1][keep], positions[2][keep])
    rotary = model.model.language_model.rotary_emb
    wrong_way_error = 0.0
    for sample in range(3):
        kept = keep[sample]
        assert (routing.layers[1].vision_mask[sample] & ~kept).any()  # some vision tokens skipped
        subset = captured["entering"][sample, kept][None]  # (1, kept, hidden)
        kept_positions = positions[:, sample : sample + 1, kept]  # (3, 1, kept)
        with torch.no_grad():
            expected = untouched(
                subset, position_embeddings=rotary(subset, kept_positions), attention_mask=None
            )
            recomputed = untouched(  # the wrong way: positions of the shorter sequence
                subset,
                position_embeddings=rotary(subset, torch.arange(subset.shape[1])[None, None]),
                attention_mask=None,
            )
        leaving = captured["leaving"][sample]
        assert torch.allclose(leaving[kept], expected[0], atol=1e-5)
        wrong_way_error = max(wrong_way_error, float((leaving[kept] - recomputed[0]).abs().max()))
        skipped = valid[sample] & ~kept
        assert torch.equal(leaving[skipped], captured["entering"][sample, skipped])
    assert (
        wrong_way_error > 1e-4
    )  # (10x the tolerance above) the check tells original positions from recomputed ones


def test_deepstack_features_land_on_every_vision_token_after_a_mod_layer():
    """Qwen3-VL adds DeepStack features after layers 0 and 1; with layer 0 a MoD layer, every
    vision token gets its feature (kept or skipped), exactly where the dense model puts it."""
    model, processor = pmod_model("qwen3_vl", ratios=LAYER0_MOD)
    inputs = batch_inputs(processor)
    layers = model.model.language_model.layers
    captured = {}
    hooks = [
        layers[0].register_forward_hook(lambda m, args, out: captured.update(leaving=out)),
        layers[1].register_forward_pre_hook(lambda m, args: captured.update(entering=args[0])),
    ]
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
        images = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        videos = model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"]
        )
    for hook in hooks:
        hook.remove()
    image_mask = inputs["input_ids"] == model.config.image_token_id
    video_mask = inputs["input_ids"] == model.config.video_token_id
    expected = captured["leaving"].clone()
    expected[image_mask] += torch.cat(images.deepstack_features[0])
    expected[video_mask] += torch.cat(videos.deepstack_features[0])
    decision = routing.layers[0]
    skipped_vision = decision.vision_mask & ~decision.keep_mask
    assert skipped_vision.any() and (decision.vision_mask & decision.keep_mask).any()
    assert torch.allclose(captured["entering"], expected, atol=1e-6)
    added = captured["entering"] - captured["leaving"]
    assert (added[skipped_vision].abs().sum(dim=-1) > 0).all()  # skipped tokens got theirs
    assert torch.equal(added[~decision.vision_mask], torch.zeros_like(added[~decision.vision_mask]))
