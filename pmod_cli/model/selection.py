"""Top-k selection rules: which of its competing tokens a MoD layer keeps.

Each sample keeps ``keep_count`` of its competing tokens; a rule decides which. Adding a rule is
one decorated function taking

    logits       (batch, seq)  raw router scores r, in fp32 (the router computes them in fp32
                               in a bf16 / fp16 model too, see ``Router.forward``)
    candidates   (batch, seq)  bool: the tokens that compete
    keep_count   (batch,)      long: how many competing tokens each sample keeps
    normalise    logits -> (batch, seq) token weights w = 1 + f(r) of the layer's weight norm,
                 computed in the model's dtype (r rounded to it first), as the layer reweights

and returning a (batch, seq) bool mask of the competing tokens that are kept.

- ``score`` (the paper's rule, default): the highest raw scores win, compared in fp32; equal
  scores keep the earliest tokens (by place in the sample: padding shifts a sample's tokens
  alike, so its tokens keep their order).
- ``weight`` (the released code's rule): rank the NORMALISED weights w, in the model's dtype, with
  the non-competing tokens set to r = -inf before the norm (so under TanhNorm they weigh
  1 - alpha), and take ``torch.topk``. When w saturates, or in bf16 where w has only tens of
  distinct values, ties decide, the way torch.topk breaks them on that device, and a
  non-competing token can take a slot: the sample then keeps fewer competing tokens. This is what
  a released checkpoint did when it was evaluated. torch.topk's tie-break depends on the row's
  length, its padding and the batch's widest k, so under ties a sample can keep other tokens
  alone than in a padded batch, as in the released code (which evaluated with batch size 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SelectionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor
]

SELECTION_RULES: dict[str, SelectionFn] = {}


def register_selection_rule(name: str) -> Callable[[SelectionFn], SelectionFn]:
    def decorator(fn: SelectionFn) -> SelectionFn:
        SELECTION_RULES[name] = fn
        return fn

    return decorator


@register_selection_rule("score")
def by_score(logits, candidates, keep_count, normalise) -> torch.Tensor:
    """The ``keep_count`` highest raw scores among the candidates; ties keep the earliest (padding
    shifts a sample's tokens alike, so that is the earliest place within the sample)."""
    batch, seq = logits.shape
    scores = logits.detach().float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (batch, seq)
    arange = torch.arange(seq, device=logits.device).expand(batch, seq)
    rank = torch.empty_like(order).scatter_(1, order, arange)  # (batch, seq): 0 = best
    return candidates & (rank < keep_count[:, None])


@register_selection_rule("weight")
def by_normalised_weight(logits, candidates, keep_count, normalise) -> torch.Tensor:
    """torch.topk over the normalised weights of all tokens, non-candidates at w(-inf)."""
    batch, seq = logits.shape
    widest = int(keep_count.max()) if batch else 0
    if widest == 0:
        return torch.zeros_like(candidates)
    weights = normalise(logits.detach().masked_fill(~candidates, float("-inf")))  # (batch, seq)
    top = torch.topk(weights, widest, dim=1, sorted=True).indices  # (batch, widest)
    # a sample that keeps fewer than the widest uses only its first keep_count slots
    slot_used = torch.arange(widest, device=logits.device)[None, :] < keep_count[:, None]
    won = torch.zeros_like(candidates).scatter_(1, top, slot_used)  # (batch, seq)
    # a non-competing winner passes the layer anyway; its slot is simply lost
    return won & candidates


def keep_top(
    scores: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor, keep_count: torch.Tensor
) -> torch.Tensor:
    """(batch, seq) bool: every real token that does not compete, plus the ``keep_count`` (batch,)
    best-scored competing tokens of each sample (the ``score`` rule: ties keep the earliest)."""
    return (valid & ~candidates) | by_score(scores, candidates, keep_count, None)
