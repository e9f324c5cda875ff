"""The weight predictor (router) and the weight norms that turn its logits into token weights.

A router is ``Linear(hidden, 1)`` with bias, both zero at the start, applied to the hidden
state entering the layer. A weight norm f maps the logits r to a token weight w = 1 + f(r);
``tanh`` and ``none`` give f(0) = 0, so a fresh router leaves the model untouched.
Adding a norm is one decorated function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (logits, candidate mask, alpha, shift) -> f(r), all (batch, seq)
WeightNormFn = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]

WEIGHT_NORM_FNS: dict[str, WeightNormFn] = {}


def register_weight_norm(name: str) -> Callable[[WeightNormFn], WeightNormFn]:
    def decorator(fn: WeightNormFn) -> WeightNormFn:
        WEIGHT_NORM_FNS[name] = fn
        return fn

    return decorator


@register_weight_norm("tanh")
def tanh_norm(
    logits: torch.Tensor, candidates: torch.Tensor, alpha: float, shift: float
) -> torch.Tensor:
    """TanhNorm: alpha * tanh(r), zero-centred and bounded by alpha."""
    return alpha * torch.tanh(logits)


@register_weight_norm("sigmoid")
def sigmoid_norm(
    logits: torch.Tensor, candidates: torch.Tensor, alpha: float, shift: float
) -> torch.Tensor:
    """alpha * sigmoid(r): the released code's ``sigmoid`` norm (bounded, not zero-centred)."""
    return alpha * torch.sigmoid(logits)


@register_weight_norm("softmax")
def softmax_norm(
    logits: torch.Tensor, candidates: torch.Tensor, alpha: float, shift: float
) -> torch.Tensor:
    """alpha * softmax(r) over each sample's competing tokens (the ablation's non-centred norm)."""
    masked = logits.masked_fill(~candidates, float("-inf"))
    probs = torch.softmax(masked.float(), dim=-1).nan_to_num(0.0).to(logits.dtype)
    return alpha * probs


@register_weight_norm("shifted_softmax")
def shifted_softmax_norm(
    logits: torch.Tensor, candidates: torch.Tensor, alpha: float, shift: float
) -> torch.Tensor:
    """alpha * softmax(r) + b: the same range as TanhNorm but not zero-centred."""
    return softmax_norm(logits, candidates, alpha, shift) + shift


@register_weight_norm("none")
def no_norm(
    logits: torch.Tensor, candidates: torch.Tensor, alpha: float, shift: float
) -> torch.Tensor:
    """The raw router output (the ablation row that overflows)."""
    return logits


class Router(nn.Linear):
    """Linear(hidden, 1) scoring each token; zero-initialised so every score starts at 0."""

    def __init__(self, hidden_size: int, device=None, dtype=None) -> None:
        super().__init__(hidden_size, 1, bias=True, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (batch, seq, hidden) -> (batch, seq)
        return super().forward(hidden_states).squeeze(-1)
