"""p-MoD for LLaVA-OneVision against the untouched HF model and against itself, on a padded batch
that mixes one image (anyres_max_9), two images and a short video; and the per-image budget."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import (
    OV_GRID_PINPOINTS,
    random_image,
    random_video,
    randomize_routers,
    save_checkpoint,
    tiny_model,
    tiny_onevision,
)
from transformers import AutoModelForImageTextToText

from pmod_cli import PMoDConfig, apply_pmod, record_routing
from pmod_cli.model import kept_count, kv_cache_lengths
from pmod_cli.model.families import get_family
from pmod_cli.model.families.llava_onevision import image_token_counts

LAYER0_MOD = [0.5, 1.0, 0.3, 0.6]
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


def generation(model, **kwargs) -> dict:
    """Greedy generation kwargs; a random model may pick a vision token, which must never be generated."""
    suppressed = [model.config.image_token_id, model.config.video_token_id]
    return dict(do_sample=False, return_dict_in_generate=True, suppress_tokens=suppressed, **kwargs)


def group_sizes(groups: torch.Tensor) -> dict[int, int]:
    ids, counts = torch.unique(groups[groups >= 0], return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))


@pytest.mark.parametrize("text", ["qwen2", "llama"])
def test_all_dense_schedule_equals_untouched_model(text):
    model, processor = tiny_onevision(text)
    dense = copy.deepcopy(model)
    inputs = batch_inputs(processor)
    with torch.no_grad():
        reference = dense(**inputs).logits
        for overrides in (
            {"beta": 2.0},
            {"ratios": [1.0] * 4},
            {"ratios": [1.0] * 4, "budget": "image"},
        ):
            apply_pmod(model, **overrides)
            assert model.retention_ratios == [1.0] * 4
            assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize("budget", ["sample", "image"])
@pytest.mark.parametrize("ratios", [None, LAYER0_MOD], ids=["prd", "layer0-mod"])
def test_cached_generation_equals_uncached(ratios, budget):
    overrides = {"ratios": ratios} if ratios else {"beta": 0.5}
    model, processor = pmod_model(**overrides, budget=budget)
    inputs = batch_inputs(processor)
    assert inputs["attention_mask"].min() == 0
    kwargs = generation(model, max_new_tokens=6, output_logits=True)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        assert torch.allclose(step_cached, step_uncached, atol=1e-4)


@pytest.mark.parametrize("budget", ["sample", "image"])
def test_sample_alone_equals_sample_in_batch(budget):
    model, processor = pmod_model(ratios=LAYER0_MOD, budget=budget)
    kwargs = generation(model, max_new_tokens=5, output_logits=True)
    with torch.no_grad():
        batched = model.generate(**batch_inputs(processor), **kwargs)
        for index in (0, 1, 2):
            alone = model.generate(**batch_inputs(processor, (index,)), **kwargs)
            assert torch.equal(alone.sequences[0, -5:], batched.sequences[index, -5:])
            for step_alone, step_batched in zip(alone.logits, batched.logits, strict=True):
                assert torch.allclose(step_alone[0], step_batched[index], atol=1e-4)


@pytest.mark.parametrize("budget", ["sample", "image"])
def test_kv_cache_lengths_are_text_plus_kept_vision_tokens(budget):
    model, processor = pmod_model(ratios=LAYER0_MOD, budget=budget)
    family = get_family("llava_onevision")
    inputs = batch_inputs(processor)
    vision_mask = family.vision_mask(inputs["input_ids"], model.config)
    groups = family.vision_groups(inputs["input_ids"], model.config, inputs)
    real_text = (inputs["attention_mask"].sum(1) - vision_mask.sum(1)).tolist()
    new_tokens = 3
    with torch.no_grad():
        out = model.generate(
            **inputs, **generation(model, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        )
    lengths = kv_cache_lengths(out.past_key_values)
    for layer, ratio in enumerate(LAYER0_MOD):
        if ratio == 1.0:  # a dense layer caches every slot of the padded batch
            assert lengths[layer] == [inputs["input_ids"].shape[1] + new_tokens - 1] * 3
            continue
        for sample in range(3):
            if budget == "sample":
                kept = kept_count(int(vision_mask[sample].sum()), ratio)
            else:  # each image and each frame keeps floor(n * R) of its own
                kept = sum(kept_count(n, ratio) for n in group_sizes(groups[sample]).values())
            # the last generated token is not yet in the cache
            assert lengths[layer][sample] == real_text[sample] + kept + new_tokens - 1, (
                layer,
                sample,
            )


def test_routers_get_gradients_also_from_skipped_tokens():
    model, processor = pmod_model(beta=0.5)
    model.train()
    inputs = batch_inputs(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    router_logits = {}

    def keep_grad(module, args, output):
        output.retain_grad()
        router_logits[module] = output

    for layer in model.model.language_model.layers:
        if getattr(layer, "router", None) is not None:
            layer.router.register_forward_hook(keep_grad)
    with record_routing(model) as routing:
        loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert routing.layers
    for layer_idx, decision in routing.layers.items():
        router = model.model.language_model.layers[layer_idx].router
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        skipped = decision.vision_mask & ~decision.keep_mask
        assert skipped[2].any()  # the video sample skipped frames' tokens too
        assert router_logits[router].grad[skipped].abs().min() > 0  # STRing


def test_save_and_load_round_trip(tmp_path):
    model, processor = pmod_model(beta=0.4, budget="image", reweight="block")
    inputs = batch_inputs(processor)
    save_checkpoint(model, processor, tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.model_type == "pmod_llava_onevision"
    assert loaded.pmod_config == model.pmod_config and loaded.pmod_config.budget == "image"
    assert loaded.retention_ratios == model.retention_ratios
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


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


def test_per_image_budget_keeps_the_top_of_each_image_and_frame():
    model, processor = pmod_model(ratios=[1.0, 0.5, 0.3, 1.0], budget="image")
    family = get_family("llava_onevision")
    inputs = batch_inputs(processor)
    groups = family.vision_groups(inputs["input_ids"], model.config, inputs)
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
    for decision in routing.layers.values():
        for sample in range(3):
            for group, size in group_sizes(groups[sample]).items():
                members = groups[sample] == group
                kept = decision.keep_mask[sample] & members
                assert int(kept.sum()) == kept_count(size, decision.ratio)
                skipped_scores = decision.logits[sample][members & ~decision.keep_mask[sample]]
                if len(skipped_scores):
                    assert decision.logits[sample][kept].min() >= skipped_scores.max()


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
