"""Efficiency accounting: FLOPs and KV cache of a prefill (one formula for every report).

from pmod_cli.efficiency import count_flops, count_flops_for_model
from pmod_cli.model.presets import get_preset
result = count_flops(get_preset("llava-next-7b"), ratios, count="paper")   # or "full"
result.tflops, result.baseline_tflops, result.kv_cache_ratio, result.kv_cache_bytes, result.layers
count_flops(shape, ratios, routed_tokens="all", prefix_text_tokens=35)    # gamma-MoD: text competes too
calibration = measure_retention_ratios("ckpt", "calib.json", samples=16)  # threshold routing: measured ratios
count_flops(shape, ratios, method=parse_method("fastv:layer=2,ratio=0.5"))  # another method
match_method(shape, ratios, parse_method("pool"), target_flops)  # the pool count at a budget
"""

from .calibration import Calibration, measure_retention_ratios
from .flops import (
    COUNT_MODES,
    FlopsCount,
    LayerCount,
    count_flops,
    count_flops_for_model,
    match_method,
)

__all__ = [
    "COUNT_MODES",
    "Calibration",
    "FlopsCount",
    "LayerCount",
    "count_flops",
    "count_flops_for_model",
    "match_method",
    "measure_retention_ratios",
]
