"""Checks the token-method tests share: kept masks from a routing record, a layer's eager attention
rows, captured layer inputs, generation under the three attention backends."""

from __future__ import annotations

import copy

import torch
from flash_attn_cpu import install as install_flash

from pmod_cli import record_routing


def kept_masks(model, inputs, **kwargs) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    with torch.no_grad(), record_routing(model) as routing:
        logits = model(**inputs, **kwargs).logits
    return logits, {layer: d.keep_mask for layer, d in routing.layers.items()}


def eager_row_attention(layer, states, cos, sin, rows) -> torch.Tensor:
    """(tokens,) the attention each token of a compacted sequence gets from ``rows`` in
    ``layer``: HF's own eager attention module over that sequence (causal), its probabilities
    averaged over heads and over the rows."""
    length = states.shape[1]
    causal = torch.full((length, length), torch.finfo(states.dtype).min).triu(1)[None, None]
    _, probs = layer.self_attn(
        hidden_states=layer.input_layernorm(states),
        position_embeddings=(cos, sin),
        attention_mask=causal,
    )
    return probs[0].mean(dim=0)[rows].mean(dim=0)


def capture_layer_inputs(model, layers) -> tuple[dict, list]:
    captured = {}

    def hook(index, module, args, kwargs):
        states = args[0] if args else kwargs["hidden_states"]
        captured[index] = (states.detach().clone(), kwargs["position_embeddings"])

    hooks = [
        model.decoder_layers[index].register_forward_pre_hook(
            lambda m, a, k, index=index: hook(index, m, a, k), with_kwargs=True
        )
        for index in layers
    ]
    return captured, hooks


GREEDY = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)


def generate(model, inputs, **options):
    suppressed = [model.config.image_token_id]  # a random model never generates a vision token
    with torch.no_grad():
        return model.generate(**inputs, suppress_tokens=suppressed, **GREEDY, **options)


def assert_same_generation(a, b, atol=1e-4):
    assert torch.equal(a.sequences, b.sequences)
    for step_a, step_b in zip(a.logits, b.logits, strict=True):
        assert torch.allclose(step_a, step_b, atol=atol)


def backends(model, monkeypatch):
    """The eager model and copies of it under sdpa and flash-attention 2 (the CPU stand-in)."""
    install_flash(monkeypatch)
    copies = {"eager": model}
    for backend in ("sdpa", "flash_attention_2"):
        copies[backend] = copy.deepcopy(model)
        copies[backend].set_attn_implementation(backend)
    return copies
