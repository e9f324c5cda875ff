"""``pmod``: the checkpoint's own routing (Zhang et al., 2025). Its routers choose the top R_l of
the vision tokens in each MoD layer and p-MoD reweights them (``model/layer.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..schedules import kept_count
from .base import TokenMethod, register_method


@register_method
@dataclass(frozen=True)
class PMoD(TokenMethod):
    name = "pmod"
    title = (
        "p-MoD (Zhang et al., 2025): the checkpoint's routers keep floor(V * R_l) in each MoD layer"
    )
    needs_router = True
    trains = True

    @property
    def label(self) -> str:
        return "p-MoD"

    def layer_modes(self, pmod_ratios: Sequence[float]) -> list[str]:
        return ["route" if ratio < 1.0 else "dense" for ratio in pmod_ratios]

    def kept_vision_tokens(self, pmod_ratios: Sequence[float], num_vision: int) -> list[int]:
        return [kept_count(num_vision, ratio) for ratio in pmod_ratios]
