"""torch's FLOP counter on one real prefill, split the way ``pmod flops`` counts: the tests that
cross-check the count against it (the conformance suite and each method's own) share this."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from pmod_cli.efficiency import count_flops
from pmod_cli.model.cache import kv_cache_lengths
from pmod_cli.model.presets import shape_from_hf_config


@dataclass(frozen=True)
class PrefillFlops:
    linear: (
        int  # the language model's linear layers (routers included) and lm_head: the paper count
    )
    attention: int  # query-key and weight-value products inside its self-attention modules
    total: int  # every FLOP the counter saw (vision tower, projector, a method's own matmuls too)
    cache_lengths: list  # per layer, the entries the KV cache holds after the prefill


def prefill_flops(model, inputs) -> PrefillFlops:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model(**inputs, use_cache=True)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    linear = attention = 0
    for name, module in model.named_modules():
        flops = counts.get(f"{root}.{name}", {})
        if isinstance(module, torch.nn.Linear) and (
            name.startswith("model.language_model.") or name == "lm_head"
        ):
            linear += sum(flops.values())
        elif name.startswith("model.language_model.layers.") and name.endswith(".self_attn"):
            attention += sum(
                n for op, n in flops.items() if str(op).split(".")[-1] in ("bmm", "baddbmm")
            )
    total = sum(counts["Global"].values())
    return PrefillFlops(linear, attention, total, kv_cache_lengths(output.past_key_values))


def counted_flops(model, vision_tokens: int, text_tokens: int, **options) -> tuple:
    """``pmod flops``'s paper count and full count (every attention pair) of one fp32 prefill of
    these tokens through the model as it is set up (its ratios and its token method)."""
    shape = shape_from_hf_config(model.config)
    options = dict(vision_tokens=vision_tokens, text_tokens=text_tokens, dtype="fp32", **options)
    options["method"] = model.token_method
    paper = count_flops(shape, model.retention_ratios, count="paper", **options)
    full = count_flops(
        shape, model.retention_ratios, count="full", attention_pairs="all", **options
    )
    return paper, full
