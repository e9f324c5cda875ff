"""A pure-PyTorch stand-in for flash-attn 2 (the ``flash_attn`` package), and what it takes for
transformers to run ``attn_implementation="flash_attention_2"`` with it on the CPU.

Written from flash-attn 2's documented semantics (the docstrings of ``flash_attn_func`` /
``flash_attn_varlen_func`` / ``flash_attn_with_kvcache`` and of ``flash_attn.bert_padding``), not
from its code:

- q (batch, seqlen_q, nheads, headdim), k / v (batch, seqlen_k, nheads_k, headdim); the varlen
  form flattens the batch: (total, nheads, headdim) with int32 ``cu_seqlens`` (batch + 1,).
- MQA / GQA: nheads divisible by nheads_k; query heads [g * r, (g + 1) * r) use kv head g.
- ``causal``: the mask is aligned to the BOTTOM-RIGHT corner: query i of a length-Lq sequence sees
  key j iff j <= i + Lk - Lq. A query row that sees no key gives 0 (not NaN), and its
  log-sum-exp is +inf.
- ``window_size=(left, right)``: query i sees keys in [i + Lk - Lq - left, i + Lk - Lq + right]
  (-1: unbounded on that side); with ``causal`` the right side is 0.
- ``softmax_scale`` defaults to 1 / sqrt(headdim); ``softcap`` > 0 gives softcap * tanh(s / softcap)
  of the scaled scores; ``alibi_slopes`` (nheads,) or (batch, nheads) add
  -slope * |i + Lk - Lq - j|.
- Scores, softmax and the weighted sum in fp32; the output in q's dtype.

Deviations: fp32 inputs are accepted (the kernel takes fp16 / bf16 only: it is what lets the tests
compare in fp32); ``dropout_p`` must be 0 (raises otherwise); no paged KV cache (``block_table``),
no rotary in ``flash_attn_with_kvcache``.

``CALLS`` counts the calls of each entry point, so a test can tell the stand-in really ran.
``install(monkeypatch)`` puts the stand-in in ``sys.modules`` as ``flash_attn`` and patches
transformers' availability checks; monkeypatch undoes it all.
"""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types
from collections import Counter

import torch
import torch.nn.functional as F

__version__ = "2.8.3"
CALLS: Counter = Counter()
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- the attention itself ------------------------------------------------------------------


def _allowed(q_lens, k_lens, q_len: int, k_len: int, causal: bool, window_size) -> torch.Tensor:
    """(batch, q_len, k_len) bool: which keys each query sees, aligned bottom-right per sample;
    sample b has ``q_lens[b]`` queries and ``k_lens[b]`` keys, the rest is padding (sees nothing,
    is seen by none)."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(q_len, device=q_lens.device)[None, :, None]
    j = torch.arange(k_len, device=q_lens.device)[None, None, :]
    diagonal = i + (k_lens - q_lens)[:, None, None]  # the key a query is aligned with
    allowed = (i < q_lens[:, None, None]) & (j < k_lens[:, None, None])
    if right >= 0:
        allowed = allowed & (j <= diagonal + right)
    if left >= 0:
        allowed = allowed & (j >= diagonal - left)
    return allowed


def _attend(q, k, v, q_lens, k_lens, options, slopes):
    """Padded sequences: q (B, Lq, H, D), k / v (B, Lk, Hk, D), their lengths (B,);
    ``options`` (scale, causal, window_size, softcap); slopes (B, H) or None.
    Returns out (B, Lq, H, D) fp32, lse (B, H, Lq) fp32, probs (B, H, Lq, Lk) fp32."""
    scale, causal, window_size, softcap = options
    q_len, heads, k_len, kv_heads = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    group = heads // kv_heads
    qf = q.float().transpose(1, 2)  # (B, H, Lq, D)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if slopes is not None:
        i = torch.arange(q_len, device=q.device)[None, :, None] + (k_lens - q_lens)[:, None, None]
        distance = (i - torch.arange(k_len, device=q.device)[None, None, :]).abs()
        scores = scores - slopes.float()[:, :, None, None] * distance[:, None]
    allowed = _allowed(q_lens, k_lens, q_len, k_len, causal, window_size)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(dim=-1, keepdim=True)  # rows that see no key: probabilities 0, output 0
    # no NaN on the way, forward or backward: an empty row's log-sum-exp is taken over zeros
    lse = torch.logsumexp(scores.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    probs = torch.exp(scores - lse)  # exp(-inf) = 0 wherever a key is hidden
    out = torch.matmul(probs, vf).transpose(1, 2)  # (B, Lq, H, D)
    return out, lse.masked_fill(empty, float("inf")).squeeze(-1), probs


def _check(q, k, v, dropout_p, heads_dim=-2):
    if dropout_p != 0.0:
        raise NotImplementedError("the CPU stand-in of flash-attn runs without dropout")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[heads_dim] % k.shape[heads_dim]:
        raise ValueError("the number of query heads must be divisible by the number of kv heads")


def _options(q, softmax_scale, causal, window_size, softcap):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return scale, causal, tuple(window_size), softcap


def _slopes(alibi_slopes, batch: int):
    """(batch, H) slopes, or None."""
    if alibi_slopes is None or alibi_slopes.dim() == 2:
        return alibi_slopes
    return alibi_slopes.expand(batch, -1)


def _lengths(batch: int, length: int, device) -> torch.Tensor:
    return torch.full((batch,), length, dtype=torch.long, device=device)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (batch, Lq, H, D), k / v (batch, Lk, Hk, D) -> out (batch, Lq, H, D) in q's dtype
    (with ``return_attn_probs``: (out, lse (batch, H, Lq), probs (batch, H, Lq, Lk)))."""
    CALLS["flash_attn_func"] += 1
    _check(q, k, v, dropout_p)
    if q.shape[0] != k.shape[0]:
        raise ValueError("q and k must have the same batch size")
    options = _options(q, softmax_scale, causal, window_size, softcap)
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    q_lens, k_lens = _lengths(batch, q_len, q.device), _lengths(batch, k_len, q.device)
    out, lse, probs = _attend(q, k, v, q_lens, k_lens, options, _slopes(alibi_slopes, batch))
    out = out.to(q.dtype)
    return (out, lse, probs) if return_attn_probs else out


def _segments(cu_seqlens, max_seqlen, name):
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError(
            f"{name} must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    if min(lengths, default=0) < 0 or max(lengths, default=0) > int(max_seqlen):
        raise ValueError(f"{name} {bounds} does not fit max_seqlen {int(max_seqlen)}")
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """q (total_q, H, D), k / v (total_k, Hk, D); sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]
    of each -> out (total_q, H, D) (with ``return_attn_probs``: (out, lse (H, total_q), None))."""
    CALLS["flash_attn_varlen_func"] += 1
    _check(q, k, v, dropout_p)
    if block_table is not None:
        raise NotImplementedError("the CPU stand-in of flash-attn has no paged KV cache")
    q_segments = _segments(cu_seqlens_q, max_seqlen_q, "cu_seqlens_q")
    k_segments = _segments(cu_seqlens_k, max_seqlen_k, "cu_seqlens_k")
    if len(q_segments) != len(k_segments) or not q_segments:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same sequences")
    options = _options(q, softmax_scale, causal, window_size, softcap)
    q_pad, q_lens = _pad(q, q_segments)
    k_pad, k_lens = _pad(k, k_segments)
    v_pad, _ = _pad(v, k_segments)
    slopes = _slopes(alibi_slopes, len(q_segments))
    out, lse, _ = _attend(q_pad, k_pad, v_pad, q_lens, k_lens, options, slopes)
    real = torch.arange(q_pad.shape[1], device=q.device)[None, :] < q_lens[:, None]
    start, end = q_segments[0][0], q_segments[-1][1]  # rows outside every sequence stay 0
    out = F.pad(out[real], (0, 0, 0, 0, start, q.shape[0] - end)).to(q.dtype)
    if not return_attn_probs:
        return out
    lse = F.pad(lse.transpose(1, 2)[real].T.detach(), (start, q.shape[0] - end), value=math.inf)
    return out, lse, None


def _pad(x, segments):
    """(total, ...) rows, cut into ``segments`` -> (B, longest, ...) zero-padded, lengths (B,)."""
    pieces = [x[start:end] for start, end in segments]
    lengths = torch.tensor([len(piece) for piece in pieces], dtype=torch.long, device=x.device)
    return torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True), lengths


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """q (batch, Lq, H, D); k_cache / v_cache (batch, max_len, Hk, D), of which the first
    ``cache_seqlens[b]`` (int or (batch,) int32; default all) rows are used. New k / v (batch,
    Lnew, Hk, D) are written into the cache IN PLACE at ``cache_seqlens`` and attended to."""
    CALLS["flash_attn_with_kvcache"] += 1
    unsupported = (rotary_cos, cache_batch_idx, cache_leftpad, block_table)
    if any(option is not None for option in unsupported):
        raise NotImplementedError(
            "the CPU stand-in has no rotary, batch index, left pad or paged cache"
        )
    _check(q, k_cache, v_cache, 0.0)
    batch, max_len = k_cache.shape[:2]
    if cache_seqlens is None:
        lengths = [max_len] * batch
    elif isinstance(cache_seqlens, int):
        lengths = [cache_seqlens] * batch
    else:
        lengths = cache_seqlens.tolist()
    if k is not None:
        for b in range(batch):  # in place, as the kernel writes the cache
            k_cache[b, lengths[b] : lengths[b] + k.shape[1]] = k[b]
            v_cache[b, lengths[b] : lengths[b] + k.shape[1]] = v[b]
        lengths = [length + k.shape[1] for length in lengths]
    options = _options(q, softmax_scale, causal, window_size, softcap)
    q_lens = _lengths(batch, q.shape[1], q.device)
    k_lens = torch.tensor(lengths, dtype=torch.long, device=q.device)
    out, lse, _ = _attend(
        q, k_cache, v_cache, q_lens, k_lens, options, _slopes(alibi_slopes, batch)
    )
    out = out.to(q.dtype)
    return (out, lse) if return_softmax_lse else out


# ---- flash_attn.bert_padding -----------------------------------------------------------------


def index_first_axis(tensor, indices):
    """Rows ``indices`` of ``tensor`` (first_axis, ...), along its first axis."""
    return tensor[indices]


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """(batch, seqlen, ...) -> (the kept tokens (total, ...), their flat indices, cu_seqlens
    int32 (batch + 1,), the longest sequence (int), the used tokens per sequence int32 (batch,)).
    Kept tokens are those of ``attention_mask`` (and of ``unused_mask``: allocated, not used)."""
    every = attention_mask if unused_mask is None else attention_mask + unused_mask
    lengths = every.sum(dim=-1, dtype=torch.int32)
    used = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = every.flatten().nonzero().flatten()
    cu_seqlens = F.pad(lengths.cumsum(dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, int(lengths.max()), used


def pad_input(hidden_states, indices, batch, seqlen):
    """(total, ...) -> (batch, seqlen, ...): each row back at its flat index, zeros elsewhere."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_put((indices,), hidden_states)  # out of place: autograd-safe
    return out.view(batch, seqlen, *hidden_states.shape[1:])


# ---- a fake ``flash_attn`` package and transformers pointed at it ------------------------------


def fake_package() -> dict[str, types.ModuleType]:
    """``flash_attn``, ``flash_attn.flash_attn_interface`` and ``flash_attn.bert_padding``."""
    interface_names = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache")
    modules = {}
    for name, attrs in (
        ("flash_attn", (*interface_names, "__version__")),
        ("flash_attn.flash_attn_interface", interface_names),
        ("flash_attn.bert_padding", ("index_first_axis", "unpad_input", "pad_input")),
    ):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        for attr in attrs:
            setattr(module, attr, globals()[attr])
        modules[name] = module
    modules["flash_attn"].bert_padding = modules["flash_attn.bert_padding"]
    modules["flash_attn"].flash_attn_interface = modules["flash_attn.flash_attn_interface"]
    return modules


# what ``lazy_import_flash_attention`` keeps between calls
_LAZY_IMPORT_CACHE = (
    "_loaded_implementation",
    "_flash_fn",
    "_flash_varlen_fn",
    "_flash_with_kvcache_fn",
    "_pad_fn",
    "_unpad_fn",
    "_process_flash_kwargs_fn",
    "_process_with_kvcache_kwargs_fn",
)


def install(monkeypatch) -> Counter:
    """Make transformers run ``flash_attention_2`` on the CPU with this stand-in, until the test
    ends. The patches, all undone by ``monkeypatch``:

    - ``sys.modules``: the fake ``flash_attn`` package (transformers imports the kernels from it);
    - ``modeling_flash_attention_utils.is_flash_attn_2_available``: True (it chooses where
      ``lazy_import_flash_attention`` imports from; the real check wants the ``flash-attn``
      distribution and a CUDA device);
    - the FA2 entry of ``FLASH_ATTENTION_COMPATIBILITY_MATRIX``: available, on the CPU too
      (``_check_and_adjust_attn_implementation`` would otherwise fall back to the hub kernel, and
      ``_flash_attn_can_dispatch`` refuse a model whose weights are on the CPU);
    - the lazy-import cache of ``modeling_flash_attention_utils`` (reset, so the stand-in is
      imported, and whatever was there comes back afterwards).

    No distribution metadata is faked: with these checks patched, transformers 5.24 reads the
    ``flash-attn`` distribution (``packages_distributions``) only to explain a failure.

    Returns ``CALLS``, reset.
    """
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.integrations import flash_attention

    for name, module in fake_package().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", lambda *a, **k: True)
    fa2 = fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]
    monkeypatch.setitem(fa2, "general_availability_check", lambda *a, **k: True)
    monkeypatch.setitem(fa2, "supported_devices", ((lambda: True, "cpu"),))
    for cached in _LAZY_IMPORT_CACHE:
        monkeypatch.setattr(fa_utils, cached, None)
    # flash-attn >= 2.1 aligns causal masks bottom-right; transformers reads that once, at import
    assert flash_attention._use_top_left_mask is False
    CALLS.clear()
    return CALLS
