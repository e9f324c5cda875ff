"""p-MoD under ``attn_implementation="flash_attention_2"``, run on the CPU with the pure-PyTorch
stand-in of flash-attn 2 (``flash_attn_cpu.py``): transformers' own FA2 code (unpadding,
cu_seqlens, bottom-right causal alignment, the vision towers' varlen calls) and p-MoD's FA2 branch
of ``subset_attention_mask`` (a 2-D key mask over the layer's cache slots and kept tokens) against
the same weights under sdpa, for every family; and the sliding-window case FA2 cannot express.

Tolerances (fp32): one forward pass, FA2 against sdpa, atol 1e-5 on the logits of real tokens
(seen: 5e-7; padding rows differ by design: FA2 gives them 0 attention); greedy generation, atol
1e-4 per step's logits (the existing cached/uncached tests' bound) and identical tokens; a
training step, loss atol 1e-5 and every gradient within atol 5e-6 + rtol 1e-4 (seen: 5e-7).
Kept tokens must be identical. The real kernel (bf16, CUDA) is left to tests/test_gpu.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from flash_attn_cpu import install
from test_baselines import METHODS, inputs_for
from test_model_core import batch_inputs as llava_inputs
from test_onevision import batch_inputs as onevision_inputs
from test_qwen_vl import batch_inputs as qwen_inputs
from tiny_models import randomize_routers, tiny_model, tiny_onevision, tiny_qwen_vl

from pmod_cli import apply_pmod, record_routing
from pmod_cli.errors import UserError
from pmod_cli.model import family_for_model, kept_count, kv_cache_lengths
from pmod_cli.model.layer import subset_attention_mask

FA2 = "flash_attention_2"
FORWARD_ATOL = 1e-5
GENERATE_ATOL = 1e-4
LAYER0_MOD = [0.5, 1.0, 0.3, 0.6]  # layer 0 routes: nothing may take lengths from layer 0


@dataclass(frozen=True)
class Family:
    build: Callable  # () -> (model, processor), sdpa
    inputs: Callable  # (processor, indices) -> a padded batch
    samples: int


FAMILIES = {
    "llava": Family(lambda: tiny_model("llama", "llava"), llava_inputs, 2),
    "llava_next-llama": Family(lambda: tiny_model("llama", "llava_next"), llava_inputs, 2),
    "llava_next-qwen2": Family(lambda: tiny_model("qwen2", "llava_next"), llava_inputs, 2),
    "onevision": Family(lambda: tiny_onevision("qwen2"), onevision_inputs, 3),
    "qwen2_5_vl": Family(lambda: tiny_qwen_vl("qwen2_5_vl"), qwen_inputs, 3),
    "qwen3_vl": Family(lambda: tiny_qwen_vl("qwen3_vl"), qwen_inputs, 3),
}


@pytest.fixture
def fa2_calls(monkeypatch):
    """transformers runs flash_attention_2 with the CPU stand-in during the test; its call counts."""
    return install(monkeypatch)


def inputs(name: str, processor, padding: str = "left", indices=None):
    processor.tokenizer.padding_side = padding
    family = FAMILIES[name]
    return family.inputs(processor, tuple(range(family.samples)) if indices is None else indices)


def sdpa_and_fa2(name: str, **pmod):
    """The family's tiny model under sdpa and a copy under FA2 (p-MoD with random routers first,
    when ``pmod`` options are given: set_attn_implementation after apply_pmod, as training does)."""
    model, processor = FAMILIES[name].build()
    if pmod:
        apply_pmod(model, **pmod)
        randomize_routers(model)
    flash = copy.deepcopy(model)
    flash.set_attn_implementation(FA2)
    assert flash.config.text_config._attn_implementation == FA2
    assert model.config.text_config._attn_implementation == "sdpa"
    return model, flash, processor


def run(model, batch):
    with torch.no_grad(), record_routing(model) as routing:
        logits = model(**batch).logits
    return logits, {layer: d.keep_mask for layer, d in routing.layers.items()}


def generation(model, **kwargs) -> dict:
    """Greedy; a random model never generates a vision token (it has no features)."""
    suppressed = [model.config.image_token_id]
    if getattr(model.config, "video_token_id", None) is not None:
        suppressed.append(model.config.video_token_id)
    return dict(do_sample=False, return_dict_in_generate=True, suppress_tokens=suppressed, **kwargs)


def assert_same_steps(a, b, atol=GENERATE_ATOL):
    assert torch.equal(a.sequences, b.sequences)
    for step_a, step_b in zip(a.logits, b.logits, strict=True):
        assert torch.allclose(step_a, step_b, atol=atol)


# ---- one forward pass -------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_all_dense_pmod_equals_untouched_model(fa2_calls, name):
    """Every layer dense: p-MoD under FA2 is the untouched HF model under FA2 (bit for bit) and
    under sdpa (atol 1e-5), on the family's padded batch."""
    untouched, flash, processor = sdpa_and_fa2(name)
    batch = inputs(name, processor)
    real = batch["attention_mask"].bool()
    untouched_flash = copy.deepcopy(flash)
    apply_pmod(flash, ratios=[1.0] * 4)
    assert flash.retention_ratios == [1.0] * 4
    with torch.no_grad():
        reference = untouched(**batch).logits
        reference_flash = untouched_flash(**batch).logits
        logits = flash(**batch).logits
    assert torch.equal(logits, reference_flash)
    assert torch.allclose(logits[real], reference[real], atol=FORWARD_ATOL)
    assert fa2_calls["flash_attn_varlen_func"] > 0  # the padded batch was unpadded


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", FAMILIES)
def test_pmod_forward_equals_sdpa(fa2_calls, name, padding):
    """beta 0.5, random routers: the same kept tokens in every MoD layer and the same logits on
    real tokens, with the batch padded on either side."""
    model, flash, processor = sdpa_and_fa2(name, beta=0.5)
    batch = inputs(name, processor, padding)
    real = batch["attention_mask"].bool()
    assert not real.all()
    logits, kept = run(model, batch)
    logits_flash, kept_flash = run(flash, batch)
    assert kept and kept.keys() == kept_flash.keys()
    for layer in kept:
        assert torch.equal(kept[layer], kept_flash[layer]), layer
        assert not kept[layer][real].all()  # the layer skipped some vision tokens
    assert torch.allclose(logits_flash[real], logits[real], atol=FORWARD_ATOL)
    assert fa2_calls["flash_attn_varlen_func"] > 0


# ---- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_generation_equals_uncached(fa2_calls, name):
    """Layer 0 routes; a left-padded batch whose samples keep different numbers of tokens, so the
    MoD layers' caches hold padding slots that the 2-D key mask must hide at every step. KV cache
    lengths are text + kept vision tokens."""
    _, flash, processor = sdpa_and_fa2(name, ratios=LAYER0_MOD)
    batch = inputs(name, processor)
    new_tokens = 3
    kwargs = generation(
        flash, max_new_tokens=new_tokens, min_new_tokens=new_tokens, output_logits=True
    )
    with torch.no_grad():
        cached = flash.generate(**batch, **kwargs)
        assert fa2_calls["flash_attn_varlen_func"] > 0
        uncached = flash.generate(**batch, use_cache=False, **kwargs)
    assert_same_steps(cached, uncached)
    vision = family_for_model(flash).vision_mask(batch["input_ids"], flash.config)
    text = (batch["attention_mask"].sum(1) - vision.sum(1)).tolist()
    lengths = kv_cache_lengths(cached.past_key_values)
    for layer, ratio in enumerate(LAYER0_MOD):
        if ratio == 1.0:
            width = batch["input_ids"].shape[1] + new_tokens - 1
            assert lengths[layer] == [width] * len(text)
            continue
        expected = [
            t + kept_count(int(v), ratio) + new_tokens - 1
            for t, v in zip(text, vision.sum(1), strict=True)
        ]
        assert lengths[layer] == expected, layer


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_alone_equals_sample_in_batch(fa2_calls, name):
    """Alone, a sample runs the kernel without a mask (flash_attn_func); in the batch, unpadded
    (flash_attn_varlen_func): the same tokens and logits."""
    _, flash, processor = sdpa_and_fa2(name, ratios=LAYER0_MOD)
    kwargs = generation(flash, max_new_tokens=2, output_logits=True)
    with torch.no_grad():
        batched = flash.generate(**inputs(name, processor), **kwargs)
        for index in range(FAMILIES[name].samples):
            alone = flash.generate(**inputs(name, processor, indices=(index,)), **kwargs)
            assert torch.equal(alone.sequences[0, -2:], batched.sequences[index, -2:])
            for step_alone, step_batched in zip(alone.logits, batched.logits, strict=True):
                assert torch.allclose(step_alone[0], step_batched[index], atol=GENERATE_ATOL)
    assert fa2_calls["flash_attn_func"] > 0 and fa2_calls["flash_attn_varlen_func"] > 0


def test_a_cached_multi_token_continuation_equals_sdpa(fa2_calls):
    """A second call of several tokens over a p-MoD cache with padding slots: more queries than
    one and fewer than the keys, so transformers takes the query mask from the key mask's last
    columns (the kept new tokens), and the kernel aligns causality bottom-right per sample."""
    model, flash, processor = sdpa_and_fa2("llava_next-llama", ratios=LAYER0_MOD)
    batch = inputs("llava_next-llama", processor)
    more = processor.tokenizer([" red square", " two"], return_tensors="pt", padding=True)
    assert not more["attention_mask"].bool().all()  # padding inside the continuation too
    logits = {}
    for attn, m in (("sdpa", model), (FA2, flash)):
        with torch.no_grad():
            first = m(**batch, use_cache=True)
            mask = torch.cat([batch["attention_mask"], more["attention_mask"]], dim=1)
            second = m(
                input_ids=more["input_ids"],
                attention_mask=mask,
                cache=first.past_key_values,
            )
        logits[attn] = second.logits
    real = more["attention_mask"].bool()
    assert torch.allclose(logits[FA2][real], logits["sdpa"][real], atol=FORWARD_ATOL)
    assert fa2_calls["flash_attn_varlen_func"] > 0


# ---- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_training_step_equals_sdpa(fa2_calls, name):
    """Right-padded (as training pads), train mode: the loss and every gradient, the routers'
    included, as under sdpa."""
    model, flash, processor = sdpa_and_fa2(name, beta=0.5)
    batch = inputs(name, processor, "right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    results = []
    for m in (model, flash):
        m.train()
        loss = m(**batch, labels=labels).loss
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss, grads), (loss_flash, grads_flash) = results
    assert torch.allclose(loss_flash, loss, atol=FORWARD_ATOL)
    assert grads.keys() == grads_flash.keys()
    routers = [n for n in grads if ".router." in n]
    assert routers and all(grads[n].abs().sum() > 0 for n in routers)
    for n in grads:
        assert torch.allclose(grads_flash[n], grads[n], atol=5e-6, rtol=1e-4), n
    assert fa2_calls["flash_attn_varlen_func"] > 0


# ---- the training-free methods ------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,layout",
    [("fastv", "llava"), ("fastv_mean", "llava_next"), ("random", "llava_next"), ("pool", "llava")],
)
def test_training_free_methods_equal_sdpa(fa2_calls, method, layout):
    """FastV (its ranking layer runs the FA2 layer and ranks from its own q, k), random and pool,
    on a trained-looking p-MoD checkpoint: the same generation as under sdpa."""
    model, processor = tiny_model("llama", layout)
    apply_pmod(model, beta=0.5)
    randomize_routers(model)
    METHODS[method](model)
    flash = copy.deepcopy(model)
    flash.set_attn_implementation(FA2)
    batch = inputs_for(processor, model)
    kwargs = generation(model, max_new_tokens=3, output_logits=True)
    with torch.no_grad(), record_routing(model) as routing:
        reference = model.generate(**batch, **kwargs)
    with torch.no_grad(), record_routing(flash) as routing_flash:
        result = flash.generate(**batch, **kwargs)
    assert_same_steps(result, reference)
    for first, second in zip(routing.calls, routing_flash.calls, strict=True):
        for layer in first:
            assert torch.equal(first[layer].keep_mask, second[layer].keep_mask)
    assert fa2_calls["flash_attn_varlen_func"] > 0


# ---- sliding windows ------------------------------------------------------------------------------


def test_the_flash_mask_is_a_2d_key_mask_over_cache_slots_and_kept_tokens():
    positions = torch.tensor([[0, 2, 5], [1, 3, 40]])  # 40: a padding slot's, never counted
    query_valid = torch.tensor([[True, True, True], [True, True, False]])
    past_valid = torch.tensor([[True, True], [True, False]])
    past_positions = torch.tensor([[-2, -1], [-2, -50]])
    args = (FA2, positions[:1], None, None, None, None, torch.float32)
    assert subset_attention_mask(*args) is None  # one sample, no cache: the kernel's causal mode
    mask = subset_attention_mask(
        FA2, positions, query_valid, past_valid, past_positions, None, torch.float32
    )
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]]
    # a window no key reaches is no window at all: accepted (span 7 < 8) ...
    subset_attention_mask(FA2, positions, query_valid, past_valid, past_positions, 8, torch.float32)
    # ... one that some key reaches would be counted in slots by the kernel: refused
    with pytest.raises(UserError, match="sdpa"):
        subset_attention_mask(
            FA2, positions, query_valid, past_valid, past_positions, 7, torch.float32
        )


@pytest.mark.parametrize("window", [None, 8, 64])
def test_sliding_window_models(fa2_calls, window):
    """Mistral with a sliding window: dense layers follow HF (the kernel's window_size); a MoD
    layer's window counts original positions under sdpa, which the kernel cannot: FA2 then
    refuses, unless the window reaches no key (64 here)."""
    model, processor = tiny_model("mistral", "llava")
    model.config.text_config.sliding_window = window
    dense_flash = copy.deepcopy(model)
    dense_flash.set_attn_implementation(FA2)
    batch = inputs("llava", processor)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        assert torch.allclose(
            dense_flash(**batch).logits[real], model(**batch).logits[real], atol=FORWARD_ATOL
        )
    apply_pmod(model, ratios=LAYER0_MOD)
    randomize_routers(model)
    flash = copy.deepcopy(model)
    flash.set_attn_implementation(FA2)
    if window == 8:
        with pytest.raises(UserError, match="sliding window of 8"):
            run(flash, batch)
        return
    logits, kept = run(model, batch)
    logits_flash, kept_flash = run(flash, batch)
    assert all(torch.equal(kept[layer], kept_flash[layer]) for layer in kept)
    assert torch.allclose(logits_flash[real], logits[real], atol=FORWARD_ATOL)
    assert fa2_calls["flash_attn_varlen_func"] > 0
