"""The attention a token receives, recomputed for the methods that rank by it (FastV, PyramidDrop,
SparseVLM), with no ``output_attentions``: any attention backend works; and the prompt's parts
they rank with."""

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


def text_after_image(vision: torch.Tensor, valid: torch.Tensor, prompt: int | None):
    """(batch, seq) bool: each sample's real prompt tokens after its image (inside ``generate``
    the prompt's columns only, so uncached decoding chooses what the cached prefill chose)."""
    seq = vision.shape[1]
    index = torch.arange(seq, device=vision.device).expand_as(vision)
    last_image = torch.where(vision, index, -1).max(dim=1).values  # (batch,)
    prompt_end = prompt_ends(valid, prompt)  # (batch,)
    return valid & (index > last_image[:, None]) & (index <= prompt_end[:, None])


def row_attention(layer, hidden_states, position_embeddings, present, rows, row_valid):
    """(batch, seq) float32: the attention each present token receives from the query rows in
    ``layer``, mean over heads and rows (0 for tokens not present).

    ``hidden_states`` (batch, seq, hidden) is the layer's input; q is projected for the rows only
    and k for the present tokens only, through the layer's own modules (so adapters, sharded and
    quantized weights work as in the layer)."""
    attention = layer.self_attn
    batch, seq, _ = hidden_states.shape
    width = int(present.sum(dim=1).max())
    # the present tokens first, in order; a sample with fewer is padded with absent ones
    key_index = torch.sort(present.to(torch.uint8), dim=1, descending=True, stable=True).indices
    key_index = key_index[:, :width]  # (batch, keys)
    key_valid = present.gather(1, key_index)
    q = _heads(layer, "q", hidden_states, rows, position_embeddings)  # (batch, heads, rows, d)
    k = _heads(layer, "k", hidden_states, key_index, position_embeddings)  # (b, kv, keys, d)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (batch, heads, keys, head_dim)
    logits = torch.matmul(q, k.transpose(-1, -2)) * attention.scaling  # (b, heads, rows, keys)
    allowed = key_valid[:, None, :] & (key_index[:, None, :] <= rows[:, :, None])  # (b, rows, keys)
    window = sliding_window(attention)
    if window is not None:
        allowed = allowed & (rows[:, :, None] - key_index[:, None, :] < window)
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    row_weight = row_valid.float() / row_valid.sum(dim=1, keepdim=True).clamp(min=1)
    received = (probs.mean(dim=1) * row_weight[:, :, None]).sum(dim=1)  # (batch, keys)
    received = received.masked_fill(~key_valid, 0.0)
    return torch.zeros(batch, seq, device=received.device).scatter(1, key_index, received)


def _heads(layer, which: str, hidden_states, index, position_embeddings) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) fp32: the tokens at ``index`` (batch, tokens) projected
    by the layer's ``q_proj`` / ``k_proj`` (then its per-head norm, if any), with their RoPE."""
    attention = layer.self_attn
    batch, tokens = index.shape
    hidden = hidden_states.shape[-1]
    states = hidden_states.gather(1, index[:, :, None].expand(batch, tokens, hidden))
    projected = getattr(attention, f"{which}_proj")(layer.input_layernorm(states))
    projected = projected.view(batch, tokens, -1, attention.head_dim)
    norm = getattr(attention, f"{which}_norm", None)  # Qwen3: RMSNorm per head before RoPE
    if norm is not None:
        projected = norm(projected)
    heads = projected.transpose(1, 2).float()
    cos, sin = (
        part.expand(batch, -1, -1).gather(
            1, index[:, :, None].expand(batch, tokens, part.shape[-1])
        )
        for part in position_embeddings
    )
    cos, sin = cos[:, None].float(), sin[:, None].float()  # (batch, 1, tokens, head_dim)
    half = heads.shape[-1] // 2
    rotated = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
    return heads * cos + rotated * sin
