"""The attention a token receives, recomputed for the methods that rank by it (FastV), with no
``output_attentions``: any attention backend works."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

_PROMPT_LENGTH: ContextVar[int | None] = ContextVar("pmod_prompt_length", default=None)


@contextlib.contextmanager
def prompt_length(length: int | None) -> Iterator[None]:
    """Inside ``generate``: the width of the prompt, so that uncached decoding (which re-runs the
    whole sequence at every step) ranks with the same prompt token as the cached prefill."""
    token = _PROMPT_LENGTH.set(length)
    try:
        yield
    finally:
        _PROMPT_LENGTH.reset(token)


def current_prompt_length() -> int | None:
    return _PROMPT_LENGTH.get()


def prompt_ends(valid: torch.Tensor, length: int | None) -> torch.Tensor:
    """(batch,) the column of each sample's last real prompt token (prompt = the first ``length``
    columns; None: the whole call)."""
    seq = valid.shape[1]
    index = torch.arange(seq, device=valid.device).expand_as(valid)
    in_prompt = valid & (index < (seq if length is None else min(length, seq)))
    return torch.where(in_prompt, index, -1).max(dim=1).values


def received_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention: torch.nn.Module,
    valid: torch.Tensor,
    query_end: torch.Tensor,
    score: str = "last",
    sliding_window: int | None = None,
) -> torch.Tensor:
    """(batch, seq) float32: the attention each token receives in one layer, mean over heads.

    Recomputed in fp32 from the layer's own projections ``queries`` (batch, seq, heads*head_dim)
    and ``keys`` (batch, seq, kv_heads*head_dim) before RoPE, with its RoPE and causal + padding
    mask. ``score="last"``: the row of the query at ``query_end`` (batch,); ``"mean"``: the mean
    of the rows of every real query up to ``query_end``.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, seq, _ = queries.shape
    head_dim = attention.head_dim
    q = queries.view(batch, seq, -1, head_dim).transpose(1, 2).float()  # (batch, heads, seq, d)
    k = keys.view(batch, seq, -1, head_dim).transpose(1, 2).float()  # (batch, kv_heads, seq, d)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos.float(), sin.float())
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (batch, heads, seq, head_dim)
    index = torch.arange(seq, device=valid.device)
    if score == "last":
        row = query_end[:, None, None, None].expand(batch, q.shape[1], 1, head_dim)
        q = q.gather(2, row)  # (batch, heads, 1, head_dim)
        query_index = query_end[:, None]  # (batch, 1)
        query_weight = torch.ones(batch, 1, device=valid.device)
    else:
        query_index = index.expand(batch, seq)
        rows = valid & (index[None, :] <= query_end[:, None])  # (batch, seq)
        query_weight = rows.float() / rows.sum(dim=1, keepdim=True).clamp(min=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * attention.scaling  # (batch, heads, q, seq)
    allowed = valid[:, None, :] & (index[None, None, :] <= query_index[:, :, None])  # (b, q, seq)
    if sliding_window is not None:
        allowed = allowed & (query_index[:, :, None] - index[None, None, :] < sliding_window)
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    received = probs.mean(dim=1)  # (batch, queries, seq): mean over heads
    return (received * query_weight[:, :, None]).sum(dim=1)


def sliding_window(attention: torch.nn.Module) -> int | None:
    # Qwen2 sets it per layer (None on full-attention layers); Mistral reads its config
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)
