"""``random``: p-MoD's per-layer budget, floor(V * R_l) vision tokens in MoD layer l, drawn at
random. Seeded: the draw depends on the seed, the layer and V only, so a sample draws the same
alone or in any batch, cached or not. No router and no reweighting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..schedules import kept_count
from ..selection import keep_top
from .base import TokenMethod, register_method


@register_method
@dataclass(frozen=True)
class Random(TokenMethod):
    """Options: ``seed`` (the draw)."""

    name = "random"
    title = "random keeps p-MoD's floor(V * R_l) vision tokens, drawn at random"
    seed: int = 0

    @property
    def label(self) -> str:
        return f"random (seed {self.seed})"

    def layer_modes(self, pmod_ratios: Sequence[float]) -> list[str]:
        return ["subset" if ratio < 1.0 else "dense" for ratio in pmod_ratios]

    def kept_vision_tokens(self, pmod_ratios: Sequence[float], num_vision: int) -> list[int]:
        return [kept_count(num_vision, ratio) for ratio in pmod_ratios]

    def select(self, layer, routing, hidden_states, position_embeddings):
        candidates = routing.vision_mask & routing.token_valid
        scores = random_scores(candidates, self.seed, layer.self_attn.layer_idx)
        return keep_top(
            scores, candidates, routing.token_valid, layer.vision_budget(candidates)
        ), scores


def random_scores(candidates: torch.Tensor, seed: int, layer: int) -> torch.Tensor:
    """(batch, seq) float: a random score per candidate (-inf elsewhere).

    The j-th candidate of a sample with n candidates gets draw j of a generator seeded by
    (seed, layer, n), so a sample draws the same alone or in any batch, cached or not.
    """
    batch, seq = candidates.shape
    counts = candidates.sum(dim=1).tolist()
    table = torch.zeros(batch, max(max(counts), 1))
    for n in set(counts):
        generator = torch.Generator().manual_seed(
            ((seed * 1_000_003 + layer) * 100_003 + n) % 2**63
        )
        draw = torch.rand(n, generator=generator)
        for row, count in enumerate(counts):
            if count == n:
                table[row, :n] = draw
    index = (candidates.long().cumsum(dim=1) - 1).clamp(min=0)  # (batch, seq): j of each candidate
    scores = table.to(candidates.device).gather(1, index)
    return scores.masked_fill(~candidates, float("-inf"))
