"""gamma-MoD options of the core: shared router, routing over text, masked routing, aux loss, thresholds."""

from __future__ import annotations

import pytest
import torch
from test_model_core import LAYER0_MOD, batch_inputs
from tiny_models import randomize_routers, tiny_model
from transformers import AutoModelForImageTextToText

from pmod_cli import apply_pmod, record_routing
from pmod_cli.model import kv_cache_lengths

GAMMA = dict(
    shared_router=True,
    router_input="normed",
    routed_tokens="all",
    masked_routing=True,
    aux_loss_coef=0.01,
)
OPTION_SETS = {
    "gamma-topk": dict(GAMMA, ratios=LAYER0_MOD),
    "gamma-threshold": dict(
        GAMMA, ratios=LAYER0_MOD, inference_routing="threshold", routing_threshold=0.5
    ),
    "pmod-threshold": dict(beta=0.5, inference_routing="threshold", routing_threshold=0.4),
}


def converted(layout="llava_next", **options):
    model, processor = tiny_model("llama", layout)
    apply_pmod(model, **options)
    randomize_routers(model, std=1.0)
    return model, processor


def test_shared_router_is_one_set_of_parameters(tmp_path):
    model, processor = converted(**GAMMA, beta=0.5)
    text_model = model.model.language_model
    mod_layers = [layer for layer in text_model.layers if layer.is_mod]
    assert len(mod_layers) == 3
    assert all(layer.active_router is text_model.pmod_shared_router for layer in mod_layers)
    router_params = [name for name, _ in model.named_parameters() if "router" in name]
    assert router_params == [
        "model.language_model.pmod_shared_router.weight",
        "model.language_model.pmod_shared_router.bias",
    ]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    inputs = batch_inputs(processor)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_masked_routing_always_keeps_question_and_answer_tokens():
    model, processor = converted(**GAMMA, beta=0.5)
    model.train()
    inputs = batch_inputs(processor)
    with record_routing(model) as routing:
        model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
    real = inputs["attention_mask"].bool()
    for decision in routing.layers.values():
        for b in range(2):
            last_image = int(decision.vision_mask[b].nonzero().max())
            after = torch.arange(real.shape[1]) > last_image
            assert decision.keep_mask[b][after & real[b]].all()  # question/answer always processed
            prefix = real[b] & ~after
            assert not decision.keep_mask[b][prefix].all()  # system prompt and image compete
            # text before the image competes too (routed_tokens="all")
            text_prefix = prefix & ~decision.vision_mask[b]
            assert text_prefix.any()


def test_unmasked_routing_lets_every_text_token_compete_in_training():
    model, processor = converted(**dict(GAMMA, masked_routing=False), beta=0.5)
    model.train()
    inputs = batch_inputs(processor)
    with record_routing(model) as routing:
        model(**inputs, labels=inputs["input_ids"])
    skipped_text = [
        (~d.keep_mask & ~d.vision_mask & inputs["attention_mask"].bool()).any()
        for d in routing.layers.values()
    ]
    assert any(skipped_text)


def test_aux_loss_reaches_the_router():
    def router_grad(coef):
        model, processor = converted(**dict(GAMMA, aux_loss_coef=coef), beta=0.5)
        model.train()
        inputs = batch_inputs(processor)
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss.detach(), model.model.language_model.pmod_shared_router.weight.grad.clone()

    loss_plain, grad_plain = router_grad(0.0)
    loss_aux, grad_aux = router_grad(1.0)
    assert loss_aux > loss_plain  # the binary cross-entropy terms are positive
    assert not torch.allclose(grad_plain, grad_aux)


def test_threshold_routing_keeps_tokens_above_the_threshold():
    model, processor = converted(**OPTION_SETS["gamma-threshold"])
    inputs = batch_inputs(processor)
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
    real = inputs["attention_mask"].bool()
    positions = torch.arange(real.shape[1]).expand_as(real)
    kept_counts = set()
    for decision in routing.layers.values():
        last_image = torch.where(decision.vision_mask, positions, -1).max(dim=1).values
        competing = real & (
            positions <= last_image[:, None]
        )  # system prompt and image, at inference
        assert torch.equal(decision.keep_mask & ~competing, real & ~competing)
        above = torch.sigmoid(decision.logits) > 0.5
        assert torch.equal(decision.keep_mask & competing, above & competing)
        kept_counts.add(int((decision.keep_mask & decision.vision_mask).sum()))
    assert len(kept_counts) > 1  # layers keep different numbers: not a fixed ratio


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_equivalences_hold_under_the_options(name):
    model, processor = converted(**OPTION_SETS[name])
    kwargs = dict(
        max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    inputs = batch_inputs(processor)
    with torch.no_grad():
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
        assert torch.equal(cached.sequences, uncached.sequences)
        for a, b in zip(cached.logits, uncached.logits, strict=True):
            assert torch.allclose(a, b, atol=1e-4)
        for index in (0, 1):
            alone = model.generate(**batch_inputs(processor, (index,)), **kwargs)
            assert torch.equal(alone.sequences[0, -5:], cached.sequences[index, -5:])
        # the cache holds exactly what each layer kept in the prefill
        with record_routing(model) as routing:
            prefill = model(**inputs, use_cache=True)
    lengths = kv_cache_lengths(prefill.past_key_values)
    for layer, decision in routing.layers.items():
        assert lengths[layer] == decision.keep_mask.sum(1).tolist()
