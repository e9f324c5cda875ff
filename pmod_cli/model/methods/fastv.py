"""``fastv``: FastV (Chen et al., 2024). Layers 0..K-1 process every token; layer K-1 ranks the
vision tokens by the attention they receive in it (the last prompt token's softmax row, mean over
heads; or averaged over every prompt token's row), and layers K..L-1 process only the top
round(V * (1 - R)) of them, the same set in every layer and in its KV cache. R is the fraction
DROPPED, FastV's own convention (R = 0.5 keeps half). No router and no reweighting: a kept token
runs the plain layer, a dropped one passes through unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..selection import keep_top
from .attention import prompt_ends, received_attention, sliding_window
from .base import MethodError, TokenMethod, register_method

FASTV_SCORES = ("last", "mean")


@register_method
@dataclass(frozen=True)
class FastV(TokenMethod):
    """Options: ``layer`` (K, at least 1: layers 0..K-1 see every token, the ranking uses layer
    K-1's attention), ``ratio`` (R in (0, 1]: the fraction of each image's vision tokens
    dropped), ``score`` (``last``: the reference code's last prompt token's row; ``mean``: the
    paper's text, the mean over every prompt token's row)."""

    name = "fastv"
    title = (
        "FastV (Chen et al., 2024) keeps round(V * (1 - R)) vision tokens after layer K "
        "(R = fraction dropped), ranked by the attention they receive in layer K-1"
    )
    knob = "ratio"
    layer: int = 2
    ratio: float = 0.5
    score: str = "last"

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise MethodError(
                f"FastV's ratio R is the fraction of vision tokens dropped, in (0, 1]; got {self.ratio}"
            )
        if self.layer < 1:
            raise MethodError(
                f"FastV's layer K must be at least 1 (it ranks with layer K-1's attention), got {self.layer}"
            )
        if self.score not in FASTV_SCORES:
            raise MethodError(
                f"unknown FastV score {self.score!r}; choose one of {', '.join(FASTV_SCORES)}"
            )

    @property
    def label(self) -> str:
        score = "" if self.score == "last" else ", mean score"
        return f"FastV K={self.layer} R={self.ratio:.4g}{score}"

    def check(self, num_layers: int, vision_tokens: int | None = None) -> None:
        if self.layer > num_layers - 1:
            raise MethodError(
                f"FastV's layer K={self.layer} is out of range for a {num_layers}-layer model: "
                f"K is between 1 and {num_layers - 1}"
            )

    def layer_modes(self, pmod_ratios: Sequence[float]) -> list[str]:
        return ["subset" if i >= self.layer else "dense" for i in range(len(pmod_ratios))]

    def kept_vision_tokens(self, pmod_ratios: Sequence[float], num_vision: int) -> list[int]:
        kept = fastv_kept(num_vision, self.ratio)
        return [num_vision if i < self.layer else kept for i in range(len(pmod_ratios))]

    def ranking_flops(self, shape, num_vision: int, num_text: int) -> int:
        """Layer K-1's query rows against every key (q and k are the layer's own): one row, or
        every prompt row for the ``mean`` score."""
        seq = num_vision + num_text
        rows = 1 if self.score == "last" else seq
        return 2 * rows * seq * shape.text.q_dim

    def settings(self, num_vision: int) -> list[TokenMethod]:
        return [self.replace(ratio=1.0 - kept / num_vision) for kept in range(num_vision)]

    def ranking_layers(self, num_layers: int) -> set[int]:
        return {self.layer - 1}

    def rank(self, layer, projections: dict, position_embeddings, routing) -> None:
        candidates = routing.vision_mask & routing.token_valid
        scores = received_attention(
            projections["q"].detach(),
            projections["k"].detach(),
            position_embeddings,
            layer.self_attn,
            routing.token_valid,
            prompt_ends(routing.token_valid, routing.prompt_length),
            self.score,
            sliding_window(layer.self_attn),
        )  # (batch, seq)
        keep_count = torch.tensor(
            [fastv_kept(int(n), self.ratio) for n in candidates.sum(dim=1)],
            device=candidates.device,
        )
        routing.ranked_keep = keep_top(scores, candidates, routing.token_valid, keep_count)
        routing.ranked_scores = scores

    def select(self, layer, routing, hidden_states, position_embeddings):
        valid = routing.token_valid
        if routing.ranked_keep is None:  # nothing was ranked, so no vision token is here
            if (routing.vision_mask & valid).any():
                raise RuntimeError(
                    f"FastV layer {layer.self_attn.layer_idx} got vision tokens that no layer ranked"
                )
            return valid, torch.zeros(valid.shape, device=valid.device)
        return routing.ranked_keep, routing.ranked_scores

    def layer_ratio(self, layer) -> float:
        return 1.0 - self.ratio


def fastv_kept(num_vision: int, ratio: float) -> int:
    """Vision tokens FastV keeps: round(V * (1 - R)), as its reference code does."""
    return int(round(num_vision * (1.0 - ratio)))
