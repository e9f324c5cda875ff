"""One conformance suite, run over every registered model family and every token-reduction method.

For each family and method: a sample alone generates what it generates in a padded batch; cached
generation equals uncached; each layer's KV cache holds T + the kept vision tokens; the kept tokens
follow the method's count (text always passes, padding never, the top-scored of each budget); a
checkpoint saves and loads; routers get gradients, from skipped tokens too; torch's FLOP counter on
a real prefill equals ``pmod flops``' count. For each family: every all-dense setting is the
untouched HF model.

A newly registered family is picked up from ``FAMILIES`` (its tiny builder goes in ``BUILDERS``),
a newly registered method from the method registry (with its default options, or those of its
row in ``SETTINGS``); every pair runs but those in ``REFUSED``. Checks specific to one family
(M-RoPE positions, video frames, DeepStack, anyres token counts) stay in its own test file.
"""

from __future__ import annotations

import copy

import pytest
import torch
from flop_counting import counted_flops, prefill_flops
from tiny_models import random_image, random_video, randomize_routers, save_checkpoint, tiny_model
from transformers import AutoModelForImageTextToText

from pmod_cli import PMoDConfig, apply_method, apply_pmod, record_routing
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.model import kept_count, kv_cache_lengths
from pmod_cli.model.families import FAMILIES, family_for_model, get_family
from pmod_cli.model.loading import load_checkpoint
from pmod_cli.model.methods import MethodError, method_class, method_names, parse_method

# ---- what the suite runs over: families, methods, and what a method says ---------------------

# family -> its tiny random-weight model and processor
BUILDERS = {
    "llava": lambda **options: tiny_model("llama", "llava", **options),
    "llava_next": lambda **options: tiny_model("llama", "next", **options),
    "llava_onevision": lambda **options: tiny_model("qwen2", "onevision", **options),
    "qwen2_5_vl": lambda **options: tiny_model(layout="qwen2_5_vl", **options),
    "qwen3_vl": lambda **options: tiny_model(layout="qwen3_vl", **options),
}
# the other language models a family takes: the core equivalences once each
OTHER_LANGUAGE_MODELS = {
    "llava-qwen2": lambda: tiny_model("qwen2", "llava"),
    "llava-mistral": lambda: tiny_model("mistral", "llava"),
    "llava_next-qwen2": lambda: tiny_model("qwen2", "next"),
    "llava_onevision-llama": lambda: tiny_model("llama", "onevision"),
}
LAYER0_MOD = PMoDConfig(ratios=[0.5, 1.0, 0.3, 0.6])  # nothing may take the length from layer 0
# the paper's schedule (ratios 1, 0.75, 0.25, 0.15), a budget per image, block reweighting
PRD_PER_IMAGE = PMoDConfig(beta=0.5, budget="image", reweight="block")
ALL_DENSE = PMoDConfig(ratios=[1.0] * 4)
# every registered method runs with its defaults and p-MoD's LAYER0_MOD plan (whose budget random
# borrows), unless listed here: id -> (--method spec, plan)
SETTINGS = {
    "pmod": {"pmod": ("pmod", LAYER0_MOD), "pmod-prd-per-image": ("pmod", PRD_PER_IMAGE)},
    "fastv": {
        "fastv": ("fastv:layer=2,ratio=0.5", LAYER0_MOD),
        "fastv-mean": ("fastv:layer=1,ratio=0.3,score=mean", LAYER0_MOD),
    },
    "random": {"random": ("random:seed=7", LAYER0_MOD)},
    "pool": {"pool": ("pool:tokens=4", LAYER0_MOD)},  # 4 x 4 patches -> 2 x 2
}
# a method without a row runs its class's ``example`` spec (or its defaults)
METHODS = {
    method_id: setting
    for name in method_names()
    for method_id, setting in SETTINGS.get(
        name, {name: (getattr(method_class(name), "example", name), LAYER0_MOD)}
    ).items()
}
# settings that drop nothing: each must be the untouched HF model
ALL_DENSE_SETTINGS = {
    "beta 2": lambda model: apply_pmod(model, PMoDConfig(beta=2.0)),
    "ratios 1": lambda model: apply_pmod(model, ALL_DENSE),
    "ratios 1, per image": lambda model: apply_pmod(model, ALL_DENSE.replace(budget="image")),
    "random at ratios 1": lambda model: apply_method(model, "random", pmod=ALL_DENSE),
}


def _refuses(name: str, family: str) -> bool:
    try:
        parse_method(getattr(method_class(name), "example", name)).check_family(FAMILIES[family])
    except MethodError:
        return True
    return False


# (family, method id) refused in one line; every other pair must run
REFUSED = {
    ("llava_next", "pool"),
    ("llava_onevision", "pool"),
    ("qwen2_5_vl", "pool"),
    ("qwen3_vl", "pool"),
    ("qwen3_vl", "fastv"),
    ("qwen3_vl", "fastv-mean"),
}
# a method without a row here declares its own refusals (its own tests check them)
REFUSED |= {
    (family, name)
    for name in method_names()
    if name not in SETTINGS
    for family in FAMILIES
    if _refuses(name, family)
}


def install(model, method_id: str):
    spec, plan = METHODS[method_id]
    return apply_method(model, spec, pmod=plan)


def uses_router(model) -> bool:
    """Whether the model's method runs its own routers (and so may rank within each image)."""
    return model.token_method.needs_router


def per_image_budget(model) -> bool:
    return uses_router(model) and model.pmod_config.budget == "image"


def subset_layers(model) -> list[bool]:
    """Per decoder layer: whether it runs on a subset of the vision tokens."""
    return [mode != "dense" for mode in model.token_method.layer_modes(model.retention_ratios)]


def counted_kept(model, num_vision: int) -> list[int]:
    """Per decoder layer: the vision tokens the method keeps of a sample's ``num_vision``."""
    return model.token_method.kept_vision_tokens(model.retention_ratios, num_vision)


FAMILY_NAMES = sorted(FAMILIES)
PAIRS = [(family, method) for family in FAMILY_NAMES for method in METHODS]
COMBOS = [pair for pair in PAIRS if pair not in REFUSED]  # what runs
ROUTED = [
    (family, method) for family, method in COMBOS if parse_method(METHODS[method][0]).needs_router
]
NEW_TOKENS = 4


# ---- a model and its inputs -------------------------------------------------------------------


def build(family: str, method: str, **options):
    """The family's tiny model running ``method`` with randomized routers (trained-looking ones,
    which the baselines must not use)."""
    model, processor = BUILDERS[family](**options)
    processor.tokenizer.padding_side = "left"
    install(model, method)
    randomize_routers(model)
    return model, processor


def samples(family: str) -> list[tuple[str, list, list]]:
    """(question, images, videos): one image; two images of other sizes (other token counts in
    every family but LLaVA); a video where the family takes videos."""
    rows = [
        ("what colour?", [random_image(60, 40, 0)], []),
        (
            "describe the two images please",
            [random_image(40, 90, 1), random_image(200, 190, 2)],
            [],
        ),
    ]
    if get_family(family).takes_video:
        rows.append(("what happens?", [], [random_video(4, 64, 96, 3)]))
    return rows


def batch_inputs(model, processor, indices=None) -> dict:
    """The chosen samples (all by default) in the family's prompt, left-padded; pooled prompts for
    the pool method. A method that takes one image per sample gets two one-image samples."""
    rows = samples(family_for_model(model).name)
    method = getattr(model, "token_method", None)  # None: the untouched HF model
    if method is not None and method.images_per_sample is not None:
        one_image = ("describe the image in one word please", [random_image(40, 90, 1)], [])
        rows = [rows[0], one_image]
    chosen = [rows[i] for i in (range(len(rows)) if indices is None else indices)]
    prompts = [
        build_prompt(processor, text, len(images), num_videos=len(videos))
        for text, images, videos in chosen
    ]
    videos = [video for _, _, row_videos in chosen for video in row_videos]
    return encode(processor, prompts, [images for _, images, _ in chosen], model, videos=videos)


def generation(model, **options) -> dict:
    """Greedy decoding that never picks a vision token's id (a random model may)."""
    family = family_for_model(model)
    suppressed = [getattr(model.config, attribute) for attribute in family.media_tokens]
    return dict(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        return_dict_in_generate=True,
        suppress_tokens=suppressed,
        **options,
    )


def vision_mask(model, inputs) -> torch.Tensor:
    return family_for_model(model).vision_mask(inputs["input_ids"], model.config)


def planned_kept(model, inputs) -> list[list[int]]:
    """Per sample, per layer: the vision tokens the method's count keeps (every one in a layer
    that runs every token); with a per-image budget, each image's and frame's count summed."""
    vision = vision_mask(model, inputs).sum(dim=1).tolist()
    if per_image_budget(model):
        counts = [
            [
                sum(kept_count(int(unit.sum()), ratio) for unit in units)
                for ratio in model.retention_ratios
            ]
            for units in budget_units(model, inputs)
        ]
    else:
        counts = [counted_kept(model, n) for n in vision]
    return [
        [count if subset else n for count, subset in zip(row, subset_layers(model), strict=True)]
        for row, n in zip(counts, vision, strict=True)
    ]


def group_sizes(groups: torch.Tensor) -> dict[int, int]:
    """Vision tokens of each image / frame id in a (seq,) row of ``vision_groups``."""
    ids, counts = torch.unique(groups[groups >= 0], return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))


def budget_units(model, inputs) -> list[list[torch.Tensor]]:
    """Per sample: (seq,) masks of the vision tokens that compete for one budget: the sample's,
    or each image's and each frame's with a per-image budget."""
    vision = vision_mask(model, inputs)
    if not per_image_budget(model):
        return [[row] for row in vision]
    family = family_for_model(model)
    groups = family.vision_groups(inputs["input_ids"], model.config, inputs)
    return [[row == group for group in group_sizes(row)] for row in groups]


def test_every_registered_family_has_a_tiny_builder():
    assert sorted(BUILDERS) == FAMILY_NAMES


@pytest.mark.parametrize("family,method", sorted(REFUSED))
def test_a_method_a_family_cannot_run_is_refused_in_one_line(family, method):
    model, _ = BUILDERS[family]()
    with pytest.raises(MethodError) as refusal:
        install(model, method)
    assert "\n" not in str(refusal.value) and get_family(family).title in str(refusal.value)


# ---- the equivalences -------------------------------------------------------------------------


def check_cached_equals_uncached(model, processor) -> None:
    inputs = batch_inputs(model, processor)
    assert inputs["attention_mask"].min() == 0  # a padded batch
    kwargs = generation(model, output_logits=True)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        assert torch.allclose(step_cached, step_uncached, atol=1e-4)


def check_alone_equals_batched(model, processor) -> None:
    kwargs = generation(model, output_logits=True)
    with torch.no_grad():
        batched = model.generate(**batch_inputs(model, processor), **kwargs)
        for index in range(len(batched.sequences)):
            alone = model.generate(**batch_inputs(model, processor, [index]), **kwargs)
            new_alone, new_batched = alone.sequences[0], batched.sequences[index]
            assert torch.equal(new_alone[-NEW_TOKENS:], new_batched[-NEW_TOKENS:])
            for step_alone, step_batched in zip(alone.logits, batched.logits, strict=True):
                assert torch.allclose(step_alone[0], step_batched[index], atol=1e-4)


def check_all_dense_is_untouched(model, processor) -> None:
    """Every setting that drops nothing is the untouched HF model, bit for bit; the dense method
    leaves a p-MoD model's routers unused and p-MoD takes them up again."""
    untouched = copy.deepcopy(model)
    inputs = batch_inputs(model, processor)
    with torch.no_grad():
        reference = untouched(**inputs).logits
        install(model, "pmod")
        randomize_routers(model)
        routed = model(**inputs).logits
        assert not torch.allclose(routed, reference, atol=1e-4)  # the routers do something
        install(model, "dense")  # a p-MoD checkpoint's routers go unused
        assert torch.equal(model(**inputs).logits, reference)
        install(model, "pmod")  # back to its own routing, with the routers it had
        assert torch.equal(model(**inputs).logits, routed)
        for name, setting in ALL_DENSE_SETTINGS.items():
            setting(model)
            assert torch.equal(model(**inputs).logits, reference), name


@pytest.mark.parametrize("family,method", COMBOS)
def test_cached_generation_equals_uncached(family, method):
    check_cached_equals_uncached(*build(family, method))


@pytest.mark.parametrize("family,method", COMBOS)
def test_sample_alone_equals_sample_in_batch(family, method):
    check_alone_equals_batched(*build(family, method))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_all_dense_setting_is_the_untouched_model(family):
    check_all_dense_is_untouched(*BUILDERS[family]())


@pytest.mark.parametrize("variant", sorted(OTHER_LANGUAGE_MODELS))
def test_other_language_models_pass_the_core_equivalences(variant):
    model, processor = OTHER_LANGUAGE_MODELS[variant]()
    processor.tokenizer.padding_side = "left"
    check_all_dense_is_untouched(model, processor)
    install(model, "pmod")
    randomize_routers(model)
    check_cached_equals_uncached(model, processor)
    check_alone_equals_batched(model, processor)


@pytest.mark.parametrize("family,method", COMBOS)
def test_kv_cache_holds_text_plus_kept_vision_tokens(family, method):
    model, processor = build(family, method)
    inputs = batch_inputs(model, processor)
    real_text = (inputs["attention_mask"].sum(1) - vision_mask(model, inputs).sum(1)).tolist()
    kept = planned_kept(model, inputs)
    with torch.no_grad():
        out = model.generate(**inputs, **generation(model, min_new_tokens=NEW_TOKENS))
    lengths = kv_cache_lengths(out.past_key_values)
    padded = inputs["input_ids"].shape[1]
    for layer, subset in enumerate(subset_layers(model)):
        for sample, length in enumerate(lengths[layer]):
            # the last generated token is not yet in the cache; a layer that runs every token
            # caches every slot of the padded batch
            expected = real_text[sample] + kept[sample][layer] if subset else padded
            assert length == expected + NEW_TOKENS - 1, (layer, sample)


@pytest.mark.parametrize("family,method", COMBOS)
def test_kept_tokens_follow_the_method(family, method):
    """Text always passes, padding never; each layer keeps the method's count of vision tokens,
    the top-scored of each budget (a method that ranks by one score); FastV keeps one set from
    layer K on."""
    model, processor = build(family, method)
    inputs = batch_inputs(model, processor)
    vision, real = vision_mask(model, inputs), inputs["attention_mask"].bool()
    kept = planned_kept(model, inputs)
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
    subset = subset_layers(model)
    assert sorted(routing.layers) == [layer for layer, routed in enumerate(subset) if routed]
    for layer, decision in routing.layers.items():
        assert torch.equal(decision.vision_mask, vision)
        assert torch.equal(decision.keep_mask & ~vision, real & ~vision)
        assert decision.kept_vision.tolist() == [row[layer] for row in kept]
        for sample, units in enumerate(budget_units(model, inputs)):
            scores, keep = decision.logits[sample], decision.keep_mask[sample]
            for unit in units:
                if per_image_budget(model):  # floor(n * R) of each image and frame
                    assert int((unit & keep).sum()) == kept_count(int(unit.sum()), decision.ratio)
                if model.token_method.top_scored and (unit & keep).any() and (unit & ~keep).any():
                    assert scores[unit & keep].min() >= scores[unit & ~keep].max(), (layer, sample)
    if model.token_method.name == "fastv":
        masks = [decision.keep_mask for decision in routing.layers.values()]
        assert all(torch.equal(mask, masks[0]) for mask in masks)


@pytest.mark.parametrize("family,method", COMBOS)
def test_save_and_load_round_trip(tmp_path, family, method):
    model, processor = build(family, method)
    inputs = batch_inputs(model, processor)
    save_checkpoint(model, processor, tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.model_type == get_family(family).pmod_model_type
    assert loaded.pmod_config == model.pmod_config
    assert loaded.token_method == model.token_method
    assert loaded.retention_ratios == model.retention_ratios
    # the one loader gives the processor back as saved: the same inputs
    _, loaded_processor = load_checkpoint(tmp_path, require_pmod=True)
    reloaded = batch_inputs(loaded, loaded_processor)
    assert reloaded.keys() == inputs.keys()
    for key in inputs:
        assert torch.equal(reloaded[key], inputs[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("family,method", ROUTED)
def test_routers_get_gradients_also_from_skipped_tokens(family, method):
    model, processor = build(family, method)
    model.train()
    inputs = batch_inputs(model, processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    router_logits = {}

    def keep_grad(module, args, output):
        output.retain_grad()
        router_logits[module] = output

    layers = family_for_model(model).decoder_layers(model)
    for layer in layers:
        if getattr(layer, "router", None) is not None:
            layer.router.register_forward_hook(keep_grad)
    with record_routing(model) as routing:
        model(**inputs, labels=labels).loss.backward()
    assert routing.layers
    for layer_idx, decision in routing.layers.items():
        router = layers[layer_idx].router
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        skipped = decision.vision_mask & ~decision.keep_mask
        assert skipped[-1].any()  # the last sample's (a video where the family takes one) too
        # STRing: skipped vision tokens are scaled by their weight, so their scores get gradient
        assert router_logits[router].grad[skipped].abs().min() > 0


@pytest.mark.parametrize("family,method", COMBOS)
def test_flop_counter_on_a_real_prefill_equals_the_count(family, method):
    """On a prefill of one image, the language model's linear layers and lm_head (``pmod flops``'
    paper count) and its attention products (the full count) as torch's FLOP counter sees them
    equal the count at the image's V and T; the cache holds the counted tokens in each layer."""
    # eager attention multiplies every query-key pair with matmuls the FLOP counter sees
    model, processor = build(family, method, attn="eager")
    inputs = batch_inputs(model, processor, [0])
    question, images, _ = samples(family)[0]
    images = model.token_method.prepare_images(list(images))  # downsample: the smaller image
    # V: the image's tokens as the processor lays them out (before any pooling)
    unpooled = processor(
        text=[build_prompt(processor, question)], images=images, return_tensors="pt"
    )
    pixels = unpooled.get("pixel_values")
    crops = pixels.shape[1] if pixels is not None and pixels.dim() == 5 else None  # anyres crops
    vision = int(vision_mask(model, unpooled).sum())
    text = int((~vision_mask(model, inputs)).sum())
    measured = prefill_flops(model, inputs)
    linear, attention, lengths = measured.linear, measured.attention, measured.cache_lengths
    paper, full = counted_flops(model, vision, text, vision_crops=crops)
    # exact, but for a method that ranks with the layers' own projections (pdrop): it runs them
    # on the side, as part of its ranking work (the full count's; its own test is exact)
    ranking = full.components.get("method_ranking", 0)
    assert paper.flops <= linear <= paper.flops + ranking
    assert attention == full.components["attention_products"]
    assert lengths == [[row.tokens] for row in full.layers]
