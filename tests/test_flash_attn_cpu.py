"""The CPU stand-in of flash-attn 2 (``flash_attn_cpu.py``) against plain softmax attention written
out with explicit loops, and transformers' own flash-attention code (unpadding, cu_seqlens, causal
alignment, packed positions) run with it. Tolerances: fp32 atol 1e-5 (fp64 reference); bf16
atol 2e-2 (the output is rounded to bf16 once)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from flash_attn_cpu import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    index_first_axis,
    install,
    pad_input,
    unpad_input,
)

FA2 = {"attn_implementation": "flash_attention_2"}
FP32_ATOL = 1e-5
BF16_ATOL = 2e-2
# (query length, key length): equal, fewer queries (decoding), more queries (rows with no key)
LENGTHS = [(5, 5), (2, 5), (1, 6), (5, 2), (6, 1), (1, 1)]
WINDOWS = [(-1, -1), (2, 0), (1, 1), (0, -1), (3, 2)]
HEADS = [(4, 4), (4, 2), (4, 1)]  # (query heads, kv heads): MHA, GQA, MQA


def reference(q, k, v, causal=False, window=(-1, -1), scale=None, softcap=0.0, slopes=None):
    """One sequence, q (Lq, H, D), k / v (Lk, Hk, D), in fp64, query by query and head by head
    (differentiable)."""
    q_len, heads, dim = q.shape
    k_len, kv_heads, _ = k.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    rows = []
    for i in range(q_len):
        diagonal = i + k_len - q_len  # bottom-right alignment
        visible = [
            j
            for j in range(k_len)
            if (not causal or j <= diagonal)
            and (window[0] < 0 or j >= diagonal - window[0])
            and (window[1] < 0 or j <= diagonal + window[1])
        ]
        row = []
        for h in range(heads):
            g = h // (heads // kv_heads)  # query heads [g * r, (g + 1) * r) share kv head g
            if not visible:  # flash-attn: a row that sees nothing gives 0
                row.append(torch.zeros(dim, dtype=torch.float64))
                continue
            keys, values = k[visible, g].double(), v[visible, g].double()
            scores = keys @ q[i, h].double() * scale  # (visible,)
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            if slopes is not None:
                distance = torch.tensor([abs(diagonal - j) for j in visible], dtype=torch.float64)
                scores = scores - float(slopes[h]) * distance
            row.append(scores.softmax(dim=0) @ values)
        rows.append(torch.stack(row))
    return torch.stack(rows) if rows else torch.zeros(0, heads, dim, dtype=torch.float64)


def qkv(batch, q_len, k_len, heads, kv_heads, dim=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, dim, generator=generator)
    k = torch.randn(batch, k_len, kv_heads, dim, generator=generator)
    v = torch.randn(batch, k_len, kv_heads, dim, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_func_equals_reference(causal, dtype):
    atol = FP32_ATOL if dtype == torch.float32 else BF16_ATOL
    for seed, ((q_len, k_len), window, (heads, kv_heads)) in enumerate(
        (lengths, window, heads) for lengths in LENGTHS for window in WINDOWS for heads in HEADS
    ):
        q, k, v = qkv(2, q_len, k_len, heads, kv_heads, dtype=dtype, seed=seed)
        out = flash_attn_func(q, k, v, causal=causal, window_size=window)
        assert out.dtype == dtype and out.shape == q.shape
        for b in range(2):
            expected = reference(q[b], k[b], v[b], causal, window)
            assert torch.allclose(out[b].double(), expected, atol=atol), (q_len, k_len, window)


def test_rows_that_see_no_key_give_zero():
    """Causal, 5 queries over 2 keys: queries 0-2 see nothing (bottom-right alignment)."""
    q, k, v = qkv(1, 5, 2, 2, 2)
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert (out[0, 3:].abs().sum(dim=-1) > 0).all()
    assert torch.isinf(lse[0, :, :3]).all() and torch.isfinite(lse[0, :, 3:]).all()
    assert probs[0, :, 3].tolist() == [[1.0, 0.0]] * 2  # query 3 sees key 0 only
    assert torch.allclose(probs[0, :, 4].sum(dim=-1), torch.ones(2))


def test_scale_softcap_and_alibi():
    q, k, v = qkv(2, 4, 6, 4, 2, seed=3)
    slopes = torch.tensor([[0.5, 0.25, 0.125, 1.0], [0.1, 0.2, 0.3, 0.4]])
    out = flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, softcap=2.0, alibi_slopes=slopes)
    for b in range(2):
        expected = reference(q[b], k[b], v[b], True, scale=0.3, softcap=2.0, slopes=slopes[b])
        assert torch.allclose(out[b].double(), expected, atol=FP32_ATOL)
    # the default scale is 1 / sqrt(headdim)
    default = flash_attn_func(q, k, v)
    assert torch.allclose(default, flash_attn_func(q, k, v, softmax_scale=8**-0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_equals_reference_per_sequence(dtype):
    """Empty, length-1 and q_len != k_len sequences in one varlen batch, GQA."""
    q_lengths, k_lengths = [3, 0, 1, 5, 4, 1], [3, 0, 4, 2, 4, 1]
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(sum(q_lengths), 4, 8, generator=generator).to(dtype)
    k = torch.randn(sum(k_lengths), 2, 8, generator=generator).to(dtype)
    v = torch.randn(sum(k_lengths), 2, 8, generator=generator).to(dtype)
    cu_q = torch.tensor([0, *q_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0, *k_lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    atol = FP32_ATOL if dtype == torch.float32 else BF16_ATOL
    for causal in (False, True):
        for window in ((-1, -1), (1, 0)):
            out = flash_attn_varlen_func(
                q, k, v, cu_q, cu_k, max(q_lengths), max(k_lengths),
                causal=causal, window_size=window,
            )  # fmt: skip
            assert out.dtype == dtype and out.shape == q.shape
            for b in range(len(q_lengths)):
                qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
                expected = reference(q[qs], k[ks], v[ks], causal, window)
                assert torch.allclose(out[qs].double(), expected, atol=atol), (b, causal, window)


def test_varlen_equals_func_and_checks_its_arguments():
    q, k, v = qkv(3, 4, 4, 4, 2, seed=5)
    cu = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
    options = dict(causal=True, softcap=3.0, alibi_slopes=torch.tensor([0.1, 0.2, 0.4, 0.8]))
    out = flash_attn_varlen_func(*flat, cu, cu, 4, 4, **options)
    assert torch.allclose(out.view(q.shape), flash_attn_func(q, k, v, **options), atol=1e-6)
    with pytest.raises(ValueError, match="max_seqlen"):
        flash_attn_varlen_func(*flat, cu, cu, 3, 4)
    with pytest.raises(TypeError, match="int32"):
        flash_attn_varlen_func(*flat, cu.long(), cu, 4, 4)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(TypeError, match="dtype"):
        flash_attn_func(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="divisible"):
        flash_attn_func(q, *qkv(3, 4, 4, 4, 3)[1:])


def test_gradients_equal_the_reference():
    """Training runs through the stand-in: its gradients are those of plain attention, with a
    row that sees no key (no NaN reaches q, k or v)."""
    q, k, v = (x.requires_grad_() for x in qkv(1, 5, 3, 4, 2, seed=11))
    flash_attn_func(q, k, v, causal=True).pow(2).sum().backward()
    grads = [x.grad for x in (q, k, v)]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    reference(q64[0], k64[0], v64[0], causal=True).pow(2).sum().backward()
    for grad, expected in zip(grads, (q64.grad, k64.grad, v64.grad), strict=True):
        assert torch.isfinite(grad).all()
        assert torch.allclose(grad.double(), expected, atol=FP32_ATOL)


def test_kvcache_appends_in_place_and_attends_to_the_prefix():
    q, k_new, v_new = qkv(2, 1, 1, 4, 2, seed=2)
    k_cache, v_cache = (torch.randn(2, 6, 2, 8) for _ in range(2))
    lengths = torch.tensor([2, 4], dtype=torch.int32)
    before = k_cache.clone()
    out = flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths, causal=True
    )
    for b, length in enumerate(lengths.tolist()):
        assert torch.equal(k_cache[b, length], k_new[b, 0])
        assert torch.equal(k_cache[b, :length], before[b, :length])
        keys, values = k_cache[b, : length + 1], v_cache[b, : length + 1]
        assert torch.allclose(out[b].double(), reference(q[b], keys, values, True), atol=FP32_ATOL)


def test_bert_padding_round_trip():
    hidden = torch.randn(3, 5, 2, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    unpadded, indices, cu_seqlens, longest, used = unpad_input(hidden, mask)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 8, 10]
    assert longest == 5 and used.tolist() == [3, 5, 2]
    assert torch.equal(unpadded, hidden[mask.bool()])
    assert torch.equal(index_first_axis(hidden.reshape(15, 2, 4), indices), unpadded)
    repadded = pad_input(unpadded, indices, 3, 5)
    assert torch.equal(repadded, hidden * mask[..., None, None])
    unused = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]])
    assert unpad_input(hidden, mask, unused)[2].tolist() == [0, 3, 8, 11]


# ---- transformers' flash-attention code, run with the stand-in --------------------------------


@pytest.mark.slow
def test_install_is_undone_afterwards():
    from transformers import modeling_flash_attention_utils as fa_utils

    names = ("is_flash_attn_2_available", "_loaded_implementation", "_flash_fn", "_pad_fn")
    before = {name: getattr(fa_utils, name) for name in names}
    matrix = dict(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2])
    with pytest.MonkeyPatch.context() as patch:
        calls = install(patch)
        functions, _ = fa_utils.lazy_import_flash_attention("flash_attention_2")
        assert functions[:2] == (flash_attn_func, flash_attn_varlen_func)
        assert functions[2].__wrapped__ is flash_attn_with_kvcache  # torch.compiler.disable'd
        assert functions[3:] == (pad_input, unpad_input)
        assert calls == {}
    assert "flash_attn" not in sys.modules and "flash_attn.bert_padding" not in sys.modules
    assert {name: getattr(fa_utils, name) for name in names} == before
    assert fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2] == matrix


def sdpa(q, k, v, allowed):
    """q (batch, Lq, H, D), k / v (batch, Lk, Hk, D), allowed (batch, Lq, Lk) -> (batch, Lq, H, D)."""
    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2).transpose(1, 2) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, allowed[:, None]
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_transformers_unpads_prefill_and_decoding(monkeypatch, padding):
    """``_flash_attention_forward`` with a 2-D padding mask: prefill (q_len == k_len) unpads with
    the mask; a decoding step (q_len 1) attends to every real cached key; real queries get what
    masked softmax attention gives them."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    calls = install(monkeypatch)
    lengths = [6, 3, 1]
    mask = torch.zeros(3, 6, dtype=torch.long)
    for b, n in enumerate(lengths):
        if padding == "left":
            mask[b, 6 - n :] = 1
        else:
            mask[b, :n] = 1
    q, k, v = qkv(3, 6, 6, 4, 2, seed=4)
    out = _flash_attention_forward(q, k, v, mask, query_length=6, is_causal=True, **FA2)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    # among real tokens, causal order is position order for either padding side
    expected = sdpa(q, k, v, causal & mask.bool()[:, None, :])
    real = mask.bool()
    assert torch.allclose(out[real], expected[real], atol=FP32_ATOL)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    step = _flash_attention_forward(q[:, -1:], k, v, mask, query_length=1, is_causal=True, **FA2)
    expected_step = sdpa(q[:, -1:], k, v, mask.bool()[:, None, :])
    assert torch.allclose(step, expected_step, atol=FP32_ATOL)
    assert calls["flash_attn_varlen_func"] == 2 and calls["flash_attn_func"] == 0


def test_transformers_bottom_right_causal_with_a_cache_and_packed_positions(monkeypatch):
    """No mask: 3 new queries over 7 keys (a cache) use the kernel's bottom-right alignment;
    packed position ids (batch 1, restarting) become cu_seqlens for the varlen kernel."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    calls = install(monkeypatch)
    q, k, v = qkv(2, 3, 7, 4, 2, seed=6)
    out = _flash_attention_forward(q, k, v, None, query_length=3, is_causal=True, **FA2)
    allowed = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4).expand(2, 3, 7)
    assert torch.allclose(out, sdpa(q, k, v, allowed), atol=FP32_ATOL)
    assert calls["flash_attn_func"] == 1
    q, k, v = qkv(1, 7, 7, 4, 2, seed=8)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    out = _flash_attention_forward(
        q, k, v, None, query_length=7, is_causal=True, position_ids=positions, **FA2
    )
    block = torch.block_diag(*(torch.ones(n, n) for n in (3, 2, 2))).bool()
    allowed = (block & torch.ones(7, 7, dtype=torch.bool).tril())[None]
    assert torch.allclose(out, sdpa(q, k, v, allowed), atol=FP32_ATOL)
    assert calls["flash_attn_varlen_func"] == 1
