"""Retention-ratio schedules: how many vision tokens each decoder layer keeps.

A schedule maps (layer index l, number of layers L, shift beta) to a raw ratio R_l. The
thresholds of the paper (eq. 6, as the released code applies them) then turn it into the ratio
a layer uses: R_l > max_ratio -> 1.0 (a dense layer, no router); otherwise max(R_l, min_ratio).

The schedules of the paper's ablation are shifted by ``beta`` so that, before thresholds, their
mean over the layers is about ``beta``; that is what lets the ablation compare them at one budget.
The released code's non-decay modes (``interleave``, ``deep_all``) use ``beta`` as the ratio of
their MoD layers instead. A dense layer of a schedule returns 1.0. Adding a schedule is one
decorated function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

ScheduleFn = Callable[[int, int, float], float]

SCHEDULES: dict[str, ScheduleFn] = {}


def register_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    def decorator(fn: ScheduleFn) -> ScheduleFn:
        SCHEDULES[name] = fn
        return fn

    return decorator


def _progress(layer: int, num_layers: int) -> float:
    """l / (L - 1): 0 at the first layer, 1 at the last (the released code's convention)."""
    return layer / (num_layers - 1) if num_layers > 1 else 0.0


@register_schedule("cosine")
def cosine(layer: int, num_layers: int, beta: float) -> float:
    """PRD, the paper's default: R_l = 0.5 * cos(pi * l / (L - 1)) + beta."""
    return 0.5 * math.cos(math.pi * _progress(layer, num_layers)) + beta


@register_schedule("linear")
def linear(layer: int, num_layers: int, beta: float) -> float:
    """Linear decay from beta + 0.5 to beta - 0.5."""
    return 0.5 - _progress(layer, num_layers) + beta


@register_schedule("stepped")
def stepped(layer: int, num_layers: int, beta: float) -> float:
    """Four equal steps, beta + 0.375, + 0.125, - 0.125, - 0.375 (mean beta)."""
    step = min(int(4 * layer / num_layers), 3)
    return beta + 0.375 - 0.25 * step


@register_schedule("constant")
def constant(layer: int, num_layers: int, beta: float) -> float:
    """The original MoD's fixed ratio: R_l = beta in every layer."""
    return beta


@register_schedule("interleaved")
def interleaved(layer: int, num_layers: int, beta: float) -> float:
    """Dense and MoD layers alternate (original MoD); MoD layers take 2*beta - 1 (mean beta)."""
    return 1.0 if layer % 2 == 0 else 2.0 * beta - 1.0


# ---- the released code's forms ------------------------------------------------------------
# The released code writes its decay with a fixed 31 (a 32-layer model's L - 1) and its non-decay
# modes as fixed layer sets at ratio beta. These reproduce a released checkpoint's layers exactly;
# the forms above are the same ideas for any depth.


@register_schedule("cosine31")
def cosine31(layer: int, num_layers: int, beta: float) -> float:
    """PRD as the released code computes it: R_l = 0.5 cos(pi l / 31) + beta, 31 whatever the depth
    (equal to ``cosine`` at 32 layers; at 40 layers the curve turns back up)."""
    return math.cos(layer * math.pi / 31) / 2 + beta  # the code's own arithmetic, bit for bit


@register_schedule("linear31")
def linear31(layer: int, num_layers: int, beta: float) -> float:
    """The released code's linear decay: R_l = 0.5 - l / 31 + beta."""
    return (-layer / 31 + 0.5) + beta


@register_schedule("interleave")
def interleave(layer: int, num_layers: int, beta: float) -> float:
    """The released code's ``interleave``: odd layers are MoD at ratio beta, even layers dense."""
    return beta if layer % 2 == 1 else 1.0


@register_schedule("deep_all")
def deep_all(layer: int, num_layers: int, beta: float) -> float:
    """The released code's ``deep_all``: layers 2 .. L-2 are MoD at ratio beta (not the last)."""
    return beta if 2 <= layer < num_layers - 1 else 1.0


@register_schedule("deep_all_include_last")
def deep_all_include_last(layer: int, num_layers: int, beta: float) -> float:
    """The released code's ``deep_all_include_last``: layers 2 .. L-1 are MoD at ratio beta."""
    return beta if layer >= 2 else 1.0


def apply_thresholds(raw: float, min_ratio: float, max_ratio: float) -> float:
    """Paper eq. 6 as released: above ``max_ratio`` the layer stays dense; below ``min_ratio`` clamp."""
    if raw > max_ratio:
        return 1.0
    return max(raw, min_ratio)


def retention_ratios(
    num_layers: int,
    schedule: str = "cosine",
    beta: float = 0.5,
    min_ratio: float = 0.15,
    max_ratio: float = 0.85,
    ratios: Sequence[float] | None = None,
    mod_layers: Sequence[int] | None = None,
) -> list[float]:
    """Per-layer retention ratios; 1.0 marks a dense layer.

    ``ratios`` (an explicit list, one per layer) bypasses the schedule and thresholds.
    ``mod_layers`` restricts MoD to those layers (e.g. chosen by ARank): the others are dense,
    and the chosen ones take the schedule's ratio clamped to [min_ratio, max_ratio].
    """
    if ratios is not None:
        if len(ratios) != num_layers:
            raise ValueError(
                f"pmod.ratios has {len(ratios)} entries but the model has {num_layers} layers"
            )
        for r in ratios:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"pmod.ratios values must be in (0, 1], got {r}")
        return [float(r) for r in ratios]
    if schedule not in SCHEDULES:
        raise ValueError(
            f"unknown schedule {schedule!r}; choose one of {', '.join(sorted(SCHEDULES))}"
        )
    if not 0.0 < min_ratio <= max_ratio <= 1.0:
        raise ValueError(
            f"need 0 < min_ratio <= max_ratio <= 1, got min {min_ratio}, max {max_ratio}"
        )
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    fn = SCHEDULES[schedule]
    raw = [fn(layer, num_layers, beta) for layer in range(num_layers)]
    if mod_layers is None:
        return [apply_thresholds(r, min_ratio, max_ratio) for r in raw]
    chosen = set(mod_layers)
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"pmod.mod_layers {bad} out of range for a {num_layers}-layer model")
    return [min(max(r, min_ratio), max_ratio) if i in chosen else 1.0 for i, r in enumerate(raw)]


def kept_count(num_vision: int, ratio: float) -> int:
    """Vision tokens a sample keeps in a layer: floor(n_vision * R_l), as the released code does."""
    if ratio >= 1.0:
        return num_vision
    # the small epsilon keeps e.g. 0.15 * 20 = 2.9999999999999996 from flooring to 2
    return int(math.floor(num_vision * ratio + 1e-9))
