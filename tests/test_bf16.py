"""bf16 on the CPU: the dense path against HF, cached against uncached generation, a sample alone
against the same sample in a left-padded batch, top-k under exact bf16 ties for both selection
rules, a training step under bf16 autocast, and the NaN stop of the trainer under autocast.

Alone vs batched: at the positions generate passes (so in evaluation), a left-padded sample's
bf16 hidden states are (nearly) those of the sample alone and every layer keeps the same tokens
under the ``score`` rule. A plain forward without position ids numbers a padded sample's
positions from the padding (HF's convention); its bf16 hidden states then differ and a score
within ~0.001 of the cut can cross it: what bf16 leaves. The ``weight`` rule (the released
code's, kept as is) ranks bf16 weights that tie, and torch.topk breaks ties by the row's length,
padding and the batch's widest k. Scores are compared in fp32 (``Router.forward``): rounded to
bf16, 21% of the cuts of these models were exact ties, decided by place instead of score."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import QWEN_IMAGE, random_image, randomize_routers, tiny_model
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from pmod_cli import apply_pmod, record_routing
from pmod_cli.model.layer import RoutingInputs
from pmod_cli.model.router import Router
from pmod_cli.training.recipe import load_recipe
from pmod_cli.training.trainer import NonFiniteLossError, PMoDTrainer

BF16 = torch.bfloat16
FAMILIES = {  # name: (text model, layout)
    "llava": ("llama", "llava"),
    "llava_next": ("llama", "next"),
    "qwen2_5_vl": ("qwen2", "qwen2_5_vl"),
}
LLAVA_PROMPTS = [
    "USER: <image>\nwhat colour? ASSISTANT:",
    "USER: <image>\ndescribe the image in one word please ASSISTANT:",
]
QWEN_PROMPTS = [
    f"user: {QWEN_IMAGE} what colour? assistant:",
    f"user: {QWEN_IMAGE}{QWEN_IMAGE} describe the two images please assistant:",
]
# alone vs batched in bf16: the dense model's logits differ by up to 0.0044 (0.002 at generate's
# positions: sdpa with and without a padding mask); p-MoD's, where no kept set differs, as much
DENSE_NOISE = 0.01
# without position ids a kept set may differ only at a near-tie: at the first layer where it
# differs, every token that changed sides scores within this of the cut (the fp32 scores of a
# sample alone and in a batch differ by up to ~0.008 from the bf16 hidden states alone; the
# largest such distance in 60 random-router configurations was 0.0012)
NEAR_TIE = 0.01


def batch_inputs(processor, family, indices=(0, 1)):
    """Two samples of different lengths, left-padded, pixel values in bf16."""
    if family == "qwen2_5_vl":
        images = [[random_image(60, 40, 0)], [random_image(40, 90, 1), random_image(200, 190, 2)]]
        prompts = QWEN_PROMPTS
    else:
        images, prompts = [[random_image(60, 40, 0)], [random_image(40, 90, 1)]], LLAVA_PROMPTS
    inputs = processor(
        images=[image for i in indices for image in images[i]],
        text=[prompts[i] for i in indices],
        return_tensors="pt",
        padding=True,
    )
    return {k: v.to(BF16) if v.is_floating_point() else v for k, v in inputs.items()}


def bf16_pmod(family, seed=1, layers=6, **overrides):
    model, processor = tiny_model(*FAMILIES[family], layers=layers)
    apply_pmod(model, **{"beta": 0.5, **overrides})
    randomize_routers(model, seed=seed)
    return model.to(BF16), processor


def forward(model, inputs):
    with torch.no_grad(), record_routing(model) as routing:
        return model(**inputs).logits.float(), routing


# ---- the dense path and the cache ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_all_dense_equals_untouched_hf_in_bf16_exactly(family):
    model, processor = tiny_model(*FAMILIES[family], layers=2)
    model = model.to(BF16)
    dense = copy.deepcopy(model)
    apply_pmod(model, beta=2.0)
    assert model.retention_ratios == [1.0, 1.0]
    inputs = batch_inputs(processor, family)
    assert torch.equal(forward(model, inputs)[0], forward(dense, inputs)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_uncached_in_bf16(family):
    model, processor = bf16_pmod(family, layers=4, ratios=[0.5, 1.0, 0.3, 0.6])
    inputs = batch_inputs(processor, family)
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, output_logits=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, output_logits=True, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached.float(), step_uncached.float(), rtol=0, atol=0.01)


# ---- a sample alone and in a left-padded batch ---------------------------------------------------


def changed_sides(alone, batched, row, length):
    """Per layer: (tokens kept alone xor in the batch, their fp32 scores alone, the cut alone)."""
    out = {}
    for layer, decision in alone.layers.items():
        vision = decision.vision_mask[0]
        kept_alone = decision.keep_mask[0][vision]
        kept_batched = batched.layers[layer].keep_mask[row, -length:][vision]
        assert kept_alone.sum() == kept_batched.sum()  # the same budget either way
        scores = decision.logits[0][vision]
        ranked = scores.sort(descending=True).values
        k = int(kept_alone.sum())
        out[layer] = (kept_alone != kept_batched, scores, (ranked[k - 1] + ranked[k]) / 2)
    return out


def generate_positions(inputs):
    """The position ids generate passes (Qwen-VL computes its own from the mask)."""
    if "image_grid_thw" in inputs:
        return {}
    mask = inputs["attention_mask"]
    return {"position_ids": (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)}


def alone_vs_batched(model, processor, family, positions):
    """(largest logit difference, per sample the layers' ``changed_sides``)."""
    batch = batch_inputs(processor, family)
    batched_logits, batched = forward(model, {**batch, **positions(batch)})
    worst, sides = 0.0, []
    for row in (0, 1):
        logits, alone = forward(model, batch_inputs(processor, family, (row,)))
        length = logits.shape[1]
        worst = max(worst, (logits[0] - batched_logits[row, -length:]).abs().max().item())
        sides.append(changed_sides(alone, batched, row, length))
    return worst, sides


def any_changed(sides) -> bool:
    return any(changed.any() for per_layer in sides for changed, *_ in per_layer.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_alone_equals_batched_at_generates_positions(family):
    """As generate (and so evaluation) runs a left-padded batch: every layer keeps the same
    tokens alone and batched, and the logits differ as little as the dense model's."""
    model, processor = bf16_pmod(family)
    worst, sides = alone_vs_batched(model, processor, family, generate_positions)
    assert not any_changed(sides) and worst <= DENSE_NOISE


def first_changes_are_weight_ties(model, processor, family) -> int:
    """The ``weight`` rule: at the first layer where a sample's kept set differs, every changed
    token's bf16 weight equals the weight at the cut (torch.topk broke a tie otherwise); returns
    how many samples' kept sets differ anywhere."""
    batch = batch_inputs(processor, family)
    _, batched = forward(model, {**batch, **generate_positions(batch)})
    differing = 0
    for row in (0, 1):
        logits, alone = forward(model, batch_inputs(processor, family, (row,)))
        for layer, (changed, *_) in changed_sides(alone, batched, row, logits.shape[1]).items():
            if changed.any():
                decision = alone.layers[layer]
                weights = decision.weights[0][decision.vision_mask[0]]
                k = int(decision.keep_mask[0][decision.vision_mask[0]].sum())
                assert (weights[changed] == weights.sort(descending=True).values[k - 1]).all()
                differing += 1
                break
    return differing


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_the_weight_rule_differs_alone_and_batched_only_by_topks_tie_break(family):
    """The released rule, kept as it is: its bf16 weights tie, and torch.topk over the padded row
    (with the batch's widest k) breaks the ties otherwise than over the sample alone."""
    model, processor = bf16_pmod(family, selection="weight")
    first_changes_are_weight_ties(model, processor, family)  # torch 2.14: 1 sample differs in both


def first_changes_are_near_ties(sides) -> int:
    """At the first layer where a sample's kept set differs, every changed token is a near-tie;
    returns how many samples' kept sets differ anywhere."""
    differing = 0
    for per_layer in sides:
        for changed, scores, cut in per_layer.values():
            if changed.any():
                assert (scores[changed] - cut).abs().max() <= NEAR_TIE
                differing += 1
                break  # later layers see hidden states the flip itself changed
    return differing


@pytest.mark.parametrize("family,seed", [("llava_next", 2), ("llava_next", 9), ("llava", 1)])
def test_without_position_ids_kept_sets_differ_only_at_near_ties(family, seed):
    """A plain forward without position ids: HF numbers a left-padded sample's positions from
    the padding, so its bf16 hidden states differ from the sample alone (the dense model's
    logits by 0.0044) and a score that close to the cut can cross it."""
    model, processor = bf16_pmod(family, seed=seed)
    worst, sides = alone_vs_batched(model, processor, family, lambda batch: {})
    if first_changes_are_near_ties(sides) == 0:
        assert worst <= DENSE_NOISE
    # llava_next seeds 2 and 9: layer 4 (3) of the padded sample swaps two tokens 0.0002
    # (0.0004) from its cut, and the logits then differ by up to 0.24: what bf16 leaves


# ---- top-k under exact bf16 ties -------------------------------------------------------------------


def mod_layer(selection):
    model, _ = tiny_model("llama", "llava", layers=2)
    apply_pmod(model, ratios=[0.5, 1.0], selection=selection)
    layer = model.model.language_model.layers[0].to(BF16)
    with torch.no_grad():  # the score is hidden[0] + hidden[1] / 1024
        layer.router.weight.zero_()
        layer.router.weight[0, :2] = torch.tensor([1.0, 2.0**-10])
        layer.router.bias.zero_()
    return layer


def crafted_states(fine, pad):
    """(1, pad + n, 64) bf16 hidden states whose exact score is 0.5 + fine / 1024: in bf16 (steps
    of 1/256 at 0.5) fine = 0, 1, 2 all round to 0.5."""
    states = torch.zeros(1, pad + len(fine), 64, dtype=BF16)
    states[0, pad:, 0] = 0.5
    states[0, pad:, 1] = torch.tensor(fine, dtype=BF16)
    valid = torch.arange(pad + len(fine))[None] >= pad
    return states, valid


def route(layer, fine, pad):
    states, valid = crafted_states(fine, pad)
    with torch.no_grad():
        keep, weights, scores = layer._route(states, RoutingInputs(valid, valid))
    return keep[0, pad:], weights[0, pad:], scores[0, pad:]


# exact scores 0.5 + FINE / 1024, all 0.5 in bf16; exactly, the 2s tie, then the 1s
FINE = [0, 2, 1, 2, 0, 1, 1, 0]


def test_the_score_rule_ranks_exact_scores_and_ties_keep_the_earliest_in_the_sample():
    layer = mod_layer("score")
    for pad in (0, 3, 5):  # alone and left-padded alike
        keep, _, scores = route(layer, FINE, pad)
        assert scores.dtype == torch.float32
        assert torch.equal(scores, 0.5 + torch.tensor(FINE) / 1024)  # exact, not bf16-rounded
        # keeps 4 of 8: both 2s, then the earliest two of the tied 1s (rounded: places 0-3)
        assert keep.nonzero().flatten().tolist() == [1, 2, 3, 5]
        # exact ties: the earliest places in the sample, whatever the padding
        keep, _, _ = route(layer, [1] * 8, pad)
        assert keep.nonzero().flatten().tolist() == [0, 1, 2, 3]


def released_weight_rule(layer, fine, pad, keep_count):
    """The released code's choice: torch.topk over the bf16 weights 1 + alpha tanh(r) of the bf16
    router output, the padding at r = -inf."""
    states, valid = crafted_states(fine, pad)
    logits = nn.Linear.forward(layer.router, states)[0, :, 0]  # bf16
    weights = 1.0 + layer.pmod_config.alpha * torch.tanh(logits.masked_fill(~valid[0], -torch.inf))
    assert weights.dtype == BF16
    return sorted((torch.topk(weights, keep_count).indices - pad).tolist())


def test_the_weight_rule_stays_the_released_topk_over_bf16_weights():
    layer = mod_layer("weight")
    kept = {}
    for pad in (0, 3, 5):
        keep, weights, _ = route(layer, FINE, pad)
        assert weights.dtype == BF16 and len(set(weights.tolist())) == 1  # all tie in bf16
        kept[pad] = keep.nonzero().flatten().tolist()
        assert kept[pad] == released_weight_rule(layer, FINE, pad, 4)
    # torch 2.14 on the CPU breaks the same ties otherwise in a padded row (alone: places 4-7,
    # after 3 padding tokens: 2-5): the released rule, kept as it is


def test_the_router_rounds_to_the_bf16_layer_output():
    """The weights w (and the ``weight`` rule) see what a bf16 nn.Linear returns, bit for bit on
    the CPU; an fp32 router returns the plain layer's output."""
    torch.manual_seed(0)
    router = Router(512)
    nn.init.normal_(router.weight, std=0.05)
    nn.init.normal_(router.bias)
    states = torch.randn(2, 300, 512)
    assert torch.equal(router(states), nn.Linear.forward(router, states).squeeze(-1))
    router, states = router.to(BF16), states.to(BF16)
    scores = router(states)
    assert scores.dtype == torch.float32
    assert torch.equal(scores.to(BF16), nn.Linear.forward(router, states).squeeze(-1))


def test_the_router_gradient_is_the_bf16_layers():
    """Through w = 1 + alpha tanh(r) in bf16, the router's gradients are those of the plain bf16
    layer, bit for bit: the fp32 value adds no fp32 copy of the hidden states to the graph."""
    torch.manual_seed(0)
    router = Router(64).to(BF16)
    nn.init.normal_(router.weight, std=0.1)
    states = torch.randn(2, 30, 64, dtype=BF16, requires_grad=True)
    grads = []
    for forward_fn in (router, lambda h: nn.Linear.forward(router, h).squeeze(-1)):
        weights = 1.0 + 0.2 * torch.tanh(forward_fn(states).to(BF16))
        router.zero_grad()
        states.grad = None
        (weights * torch.arange(30.0, dtype=BF16)).sum().backward()
        grads.append((router.weight.grad.clone(), router.bias.grad.clone(), states.grad.clone()))
    for new, legacy in zip(*grads, strict=True):
        assert new.dtype == BF16 and torch.equal(new, legacy)


# ---- training under bf16 autocast --------------------------------------------------------------


def fp32_training_batch():
    model, processor = tiny_model("llama", "next", layers=4)
    apply_pmod(model, ratios=[1.0, 0.6, 0.4, 0.3])
    randomize_routers(model)
    inputs = batch_inputs(processor, "llava_next")
    inputs["pixel_values"] = inputs["pixel_values"].float()
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return model.train(), inputs


def routers(model):
    return [layer.router for layer in model.model.language_model.layers if layer.is_mod]


def test_a_training_step_under_bf16_autocast_has_a_finite_loss_and_router_gradients():
    model, inputs = fp32_training_batch()
    with torch.autocast("cpu", dtype=BF16), record_routing(model) as routing:
        loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and len(routing.layers) == 3
    for router in routers(model):
        assert router.weight.dtype == torch.float32  # autocast leaves the parameters fp32
        grad = router.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


class Observe(TrainerCallback):
    """Records the autocast dtype the routers run under; poisons a weight with inf after
    ``poison_after`` steps, as a diverging run would."""

    def __init__(self, model, poison_after: int) -> None:
        self.poison_after, self.dtypes = poison_after, []
        for router in routers(model):
            router.register_forward_hook(lambda *_: self.dtypes.append(autocast_dtype()))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.poison_after:
            with torch.no_grad():
                model.model.language_model.layers[1].mlp.down_proj.weight[0, 0] = torch.inf


def autocast_dtype():
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def test_the_trainer_stops_on_a_non_finite_loss_under_bf16_autocast(tmp_path):
    model, inputs = fp32_training_batch()
    recipe = load_recipe("recipes/tiny.toml", [f"train.output_dir={tmp_path}"])
    args = TrainingArguments(
        output_dir=str(tmp_path),
        bf16=True,  # on the CPU: the HF Trainer runs the forward under torch.autocast("cpu", bf16)
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-4,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,
    )
    observe = Observe(model, poison_after=1)
    trainer = PMoDTrainer(
        model=model,
        args=args,
        train_dataset=[0, 1],
        data_collator=lambda _: dict(inputs),
        callbacks=[observe],
        recipe=recipe,
        vision_mask=lambda ids: ids == model.config.image_token_id,
    )
    # step 1 is finite; the inf weight makes step 2's loss non-finite, caught before its backward
    with pytest.raises(NonFiniteLossError, match="training loss became nan at step 2"):
        trainer.train()
    assert observe.dtypes == [BF16] * 6  # 3 MoD layers x 2 steps, all under bf16 autocast
