"""The p-MoD model core: a MoD layer against the HF layer on its kept tokens, gradients (STRing,
checkpointing), hidden states, attention backends, weight norms, refusals. The equivalences every
family and method passes (cache, batch, all-dense, save/load) are in test_conformance.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_models import random_image, randomize_routers, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import pmod_cli
from pmod_cli import PMoDConfig, apply_pmod, record_routing
from pmod_cli.model import kept_count
from pmod_cli.model.modeling import UnsupportedModelError

COMBOS = [("llama", "llava"), ("llama", "llava_next"), ("qwen2", "llava"), ("qwen2", "llava_next")]
PROMPTS = [
    "USER: <image>\nwhat colour? ASSISTANT:",
    "USER: <image>\ndescribe the image in one word please ASSISTANT:",
]
# layer 0 is a MoD layer here: nothing may take the sequence length from layer 0
LAYER0_MOD = [0.5, 1.0, 0.3, 0.6]


def batch_inputs(processor, indices=(0, 1)):
    images = [random_image(60, 40, 0), random_image(40, 90, 1)]
    return processor(
        images=[images[i] for i in indices],
        text=[PROMPTS[i] for i in indices],
        return_tensors="pt",
        padding=True,
    )


def pmod_model(text, layout, **overrides):
    model, processor = tiny_model(text, layout)
    apply_pmod(model, **overrides)
    randomize_routers(model)
    return model, processor


def test_without_string_skipped_tokens_get_no_gradient():
    model, processor = pmod_model("llama", "llava", beta=0.5, string=False)
    model.train()
    inputs = batch_inputs(processor)
    outputs = {}
    layer = model.model.language_model.layers[2]

    def keep_grad(module, args, output):
        output.retain_grad()
        outputs["r"] = output

    layer.router.register_forward_hook(keep_grad)
    with record_routing(model) as routing:
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    decision = routing.layers[2]
    grad = outputs["r"].grad
    assert grad[decision.vision_mask & ~decision.keep_mask].abs().max() == 0
    assert grad[decision.vision_mask & decision.keep_mask].abs().max() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    model, processor = pmod_model("llama", "llava_next", ratios=LAYER0_MOD)
    model.train()
    inputs = batch_inputs(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def grads():
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any("router" in n for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


@pytest.mark.slow
def test_checkpoint_does_not_load_as_dense_without_pmod(tmp_path):
    model, _ = pmod_model("llama", "llava")
    model.save_pretrained(tmp_path)
    script = (
        "import sys\nfrom transformers import AutoModelForImageTextToText\n"
        f"try:\n    AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r})\n"
        "except Exception as err:\n    print('refused', type(err).__name__); sys.exit(0)\nsys.exit(1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "refused" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("layout", ["llava", "llava_next"])
def test_hidden_states_are_full_length(layout):
    model, processor = pmod_model("llama", layout, ratios=LAYER0_MOD)
    inputs = batch_inputs(processor)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == 5
    for state in out.hidden_states:
        assert state.shape[:2] == inputs["input_ids"].shape


def test_eager_and_sdpa_agree():
    inputs = None
    results = {}
    for attn in ("eager", "sdpa"):
        model, processor = tiny_model("llama", "llava_next", attn=attn)
        apply_pmod(model, ratios=LAYER0_MOD)
        randomize_routers(model)
        inputs = batch_inputs(processor)
        with torch.no_grad():
            results[attn] = model.generate(
                **inputs,
                max_new_tokens=4,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
    assert torch.equal(results["eager"].sequences, results["sdpa"].sequences)
    for a, b in zip(results["eager"].logits, results["sdpa"].logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_weight_norms_and_reweight_targets():
    model, processor = tiny_model("llama", "llava")
    inputs = batch_inputs(processor)
    apply_pmod(model, beta=0.5, reweight="mlp")
    with torch.no_grad():
        mlp_fresh = model(**inputs).logits
        apply_pmod(model, reweight="block")
        block_fresh = model(**inputs).logits
        # a zero router gives w = 1, where both reweightings are the plain layer
        assert torch.allclose(mlp_fresh, block_fresh, atol=1e-5)
        randomize_routers(model)
        block = model(**inputs).logits
        apply_pmod(model, reweight="mlp")
        assert not torch.allclose(model(**inputs).logits, block, atol=1e-4)
        for norm in ("softmax", "shifted_softmax", "none"):
            apply_pmod(model, weight_norm=norm)
            assert torch.isfinite(model(**inputs).logits).all()


def test_apply_pmod_rejects_unsupported_models():
    text_only = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=100,
        )
    )
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        apply_pmod(text_only)
    with pytest.raises(ValueError, match="schedule"):
        PMoDConfig(schedule="zigzag")


def test_public_api():
    assert pmod_cli.PMoDConfig is PMoDConfig and callable(pmod_cli.apply_pmod)


@pytest.mark.parametrize("text,layout", COMBOS)
def test_mod_layer_equals_the_hf_layer_run_on_the_kept_tokens(text, layout):
    """Reference: the untouched HF layer on the kept subset (original positions), skipped tokens as they are."""
    model, processor = tiny_model(text, layout)
    apply_pmod(
        model, ratios=[1.0, 0.5, 1.0, 1.0]
    )  # fresh router: w = 1, ties keep the earliest tokens
    inputs = batch_inputs(processor, (1,))
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states
        entering, leaving = states[1][0], states[2][0]
        vision = inputs["input_ids"][0] == model.config.image_token_id
        keep = ~vision.clone()
        keep[vision.nonzero()[: kept_count(int(vision.sum()), 0.5), 0]] = True
        positions = keep.nonzero()[:, 0][None]
        text_model = model.model.language_model
        layer = text_model.layers[1]
        base_forward = type(layer).__bases__[1].forward.__wrapped__
        subset = entering[keep][None]
        expected_kept = base_forward(
            layer,
            subset,
            attention_mask=None,
            position_ids=positions,
            position_embeddings=text_model.rotary_emb(subset, positions),
        )[0]
    assert torch.allclose(leaving[keep], expected_kept, atol=1e-5)
    assert torch.equal(leaving[~keep], entering[~keep])
