"""The weight predictor (router) and the weight norms that turn its logits into token weights.

A router is ``Linear(hidden, 1)`` with bias, both zero at the start, applied to the hidden
state entering the layer. A weight norm f maps the logits r to a token weight w = 1 + f(r);
``tanh`` and ``none`` give f(0) = 0, so a fresh router leaves the model untouched.
Adding a norm is one decorated function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
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
        """(batch, seq, hidden) -> (batch, seq) fp32 scores r.

        In a bf16 / fp16 model, or under autocast, the value is the product computed in fp32
        (hidden state and weights upcast, autocast off), so a score carries no rounding of its
        own: rounded to bf16 (8 significant bits), scores one bf16 step apart tie or swap, and
        place instead of score decides which of them a layer keeps. Rounded to the model's dtype
        it is what the plain bf16 layer returns (bit for bit on the CPU). The gradient is the
        model-dtype product's, so training keeps no fp32 copy of the hidden states. An fp32
        model's scores are the plain layer's, bit for bit.
        """
        logits = super().forward(hidden_states).squeeze(-1)
        if logits.dtype == torch.float32:
            return logits
        with torch.no_grad(), _without_autocast(hidden_states.device.type):
            exact = F.linear(hidden_states.float(), self.weight.float(), self.bias.float())
        return _ExactValue.apply(logits, exact.squeeze(-1))


class _ExactValue(torch.autograd.Function):
    """Forward: ``exact`` (fp32); backward: the gradient goes to ``rounded`` (the same scores
    in half precision), as if the scores were ``rounded``."""

    @staticmethod
    def forward(ctx, rounded: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        ctx.rounded_dtype = rounded.dtype
        return exact.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.rounded_dtype), None


def _without_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
