"""Token-reduction methods that the p-MoD decoder layers run: p-MoD itself and training-free baselines.

A method says what each decoder layer does with the vision tokens of a forward call:

- ``pmod``: the checkpoint's own routing (its routers choose, p-MoD reweights);
- ``dense``: every layer processes every token (a p-MoD checkpoint's routers go unused);
- ``fastv``: FastV (Chen et al., 2024). Layers 0..K-1 process every token; layer K-1 ranks the
  vision tokens by the attention they receive in it (the last prompt token's softmax row, mean
  over heads; or averaged over every prompt token's row), and layers K..L-1 process only the top
  round(V * (1 - R)) of them, the same set in every layer and in its KV cache. R is the fraction
  DROPPED, FastV's own convention (R = 0.5 keeps half);
- ``random``: p-MoD's per-layer budget, floor(V * R_l) vision tokens in MoD layer l, drawn at
  random (seeded: the draw depends on the seed, the layer and V only);
- ``pool``: the vision tokens of each image average-pooled over their patch grid to N tokens
  before the language model (a shorter prompt); every layer is dense.

The baselines use no router and no reweighting: a kept token runs the plain layer, a dropped one
passes through unchanged. ``kept_vision_tokens`` is the per-layer count both the layers and the
FLOPs formula (``efficiency/flops.py``) use. ``MethodConfig`` is stored on a model as
``config.pmod_method``; ``modeling.apply_method`` and its ``apply_fastv``/``apply_random``/
``apply_pool``/``apply_dense`` shortcuts install one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from .schedules import kept_count

METHODS = ("pmod", "dense", "fastv", "random", "pool")
FASTV_SCORES = ("last", "mean")
# what a decoder layer does under a method (see layer_modes)
LAYER_MODES = ("dense", "route", "random", "fastv")


class MethodError(UserError, ValueError):
    """A method setting that cannot work (unknown name, ratio out of range, layer past the model)."""


@dataclass(frozen=True)
class MethodConfig:
    """One method and its settings (only the chosen method's fields matter).

    Attributes:
        name: ``pmod``, ``dense``, ``fastv``, ``random`` or ``pool``.
        fastv_layer: FastV's K, at least 1: layers 0..K-1 see every token, the ranking uses layer
            K-1's attention and layers K..L-1 run on the kept tokens.
        fastv_ratio: FastV's R, in (0, 1]: the fraction of each image's vision tokens dropped.
        fastv_score: ``last`` (the reference code: the last prompt token's attention row) or
            ``mean`` (the paper's text: the mean over every prompt token's row).
        seed: the random method's draw.
        pool_tokens: N, the vision tokens per image after pooling (``pool``).
    """

    name: str = "pmod"
    fastv_layer: int = 2
    fastv_ratio: float = 0.5
    fastv_score: str = "last"
    seed: int = 0
    pool_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise MethodError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if self.name == "fastv":
            if not 0.0 < self.fastv_ratio <= 1.0:
                raise MethodError(
                    f"FastV's ratio R is the fraction of vision tokens dropped, in (0, 1]; got {self.fastv_ratio}"
                )
            if self.fastv_layer < 1:
                raise MethodError(
                    f"FastV's layer K must be at least 1 (it ranks with layer K-1's attention), got {self.fastv_layer}"
                )
            if self.fastv_score not in FASTV_SCORES:
                raise MethodError(
                    f"unknown FastV score {self.fastv_score!r}; choose one of {', '.join(FASTV_SCORES)}"
                )
        if self.name == "pool" and (self.pool_tokens is None or self.pool_tokens < 1):
            raise MethodError(
                f"pool needs a number of pooled tokens per image of at least 1, got {self.pool_tokens}"
            )

    @property
    def label(self) -> str:
        if self.name == "fastv":
            score = "" if self.fastv_score == "last" else ", mean score"
            return f"FastV K={self.fastv_layer} R={self.fastv_ratio:.4g}{score}"
        if self.name == "random":
            return f"random (seed {self.seed})"
        if self.name == "pool":
            return f"pool {self.pool_tokens}"
        return {"pmod": "p-MoD", "dense": "dense"}[self.name]

    def check(self, num_layers: int, vision_tokens: int | None = None) -> None:
        """Refuse settings that do not fit a model of ``num_layers`` layers and ``vision_tokens``
        vision tokens per image (pool: also that they tile its patch grid)."""
        if self.name == "fastv" and self.fastv_layer > num_layers - 1:
            raise MethodError(
                f"FastV's layer K={self.fastv_layer} is out of range for a {num_layers}-layer model: "
                f"K is between 1 and {num_layers - 1}"
            )
        if self.name == "pool" and vision_tokens is not None:
            pool_grid(vision_tokens, self.pool_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> MethodConfig:
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise MethodError(f"unknown method option(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> MethodConfig:
        return dataclasses.replace(self, **changes)


def methods_from_flags(
    names: Sequence[str],
    fastv_layer: int | None = None,
    fastv_ratio: float | None = None,
    fastv_score: str | None = None,
    pool_tokens: int | None = None,
    seed: int | None = None,
    match_tflops: bool = False,
) -> list[MethodConfig]:
    """The methods of ``pmod flops`` / ``pmod eval``'s flags; every flag must belong to a chosen
    method, and ``match_tflops`` (which solves FastV's R and pool's N) replaces those two flags."""
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise MethodError(
            f"unknown --method {', '.join(unknown)}; choose from {', '.join(METHODS)}"
        )
    owners = {"--fastv-layer": ("fastv", fastv_layer), "--fastv-ratio": ("fastv", fastv_ratio)}
    owners.update(
        {
            "--fastv-score": ("fastv", fastv_score),
            "--pool-tokens": ("pool", pool_tokens),
            "--seed": ("random", seed),
        }
    )
    for flag, (owner, value) in owners.items():
        if value is not None and owner not in names:
            raise MethodError(f"{flag} only applies with --method {owner}")
    if match_tflops:
        if not {"fastv", "pool"} & set(names):
            raise MethodError(
                "--match-tflops solves FastV's ratio or pool's token count: add --method fastv or pool"
            )
        for flag, value in (("--fastv-ratio", fastv_ratio), ("--pool-tokens", pool_tokens)):
            if value is not None:
                raise MethodError(
                    f"--match-tflops chooses {flag.removeprefix('--').replace('-', ' ')} itself; drop {flag}"
                )
    elif "pool" in names and pool_tokens is None:
        raise MethodError(
            "--method pool needs --pool-tokens N (vision tokens per image after pooling) or --match-tflops"
        )
    return [
        MethodConfig(
            name=name,
            fastv_layer=2 if fastv_layer is None else fastv_layer,
            fastv_ratio=0.5 if fastv_ratio is None else fastv_ratio,
            fastv_score=fastv_score or "last",
            seed=0 if seed is None else seed,
            # a placeholder count until --match-tflops solves it
            pool_tokens=(pool_tokens or 1) if name == "pool" else None,
        )
        for name in names
    ]


# ---- what each layer does, and how many vision tokens it keeps ----------------------------


def layer_modes(method: MethodConfig, pmod_ratios: Sequence[float]) -> list[str]:
    """Per decoder layer: ``dense``, ``route`` (p-MoD's router), ``random`` or ``fastv``."""
    if method.name in ("pmod", "random"):
        subset = "route" if method.name == "pmod" else "random"
        return [subset if ratio < 1.0 else "dense" for ratio in pmod_ratios]
    if method.name == "fastv":
        return [
            "fastv" if index >= method.fastv_layer else "dense" for index in range(len(pmod_ratios))
        ]
    return ["dense"] * len(pmod_ratios)


def fastv_kept(num_vision: int, ratio: float) -> int:
    """Vision tokens FastV keeps: round(V * (1 - R)), as its reference code does."""
    return int(round(num_vision * (1.0 - ratio)))


def kept_vision_tokens(
    method: MethodConfig, pmod_ratios: Sequence[float], num_vision: int
) -> list[int]:
    """Vision tokens each decoder layer processes for an image of ``num_vision`` tokens (pool: of
    the pooled tokens entering the language model). ``pmod_ratios``: p-MoD's plan (random uses its
    budget)."""
    if method.name == "pool":
        return [method.pool_tokens] * len(pmod_ratios)
    if method.name == "fastv":
        kept = fastv_kept(num_vision, method.fastv_ratio)
        return [
            num_vision if index < method.fastv_layer else kept for index in range(len(pmod_ratios))
        ]
    if method.name == "dense":
        return [num_vision] * len(pmod_ratios)
    return [kept_count(num_vision, ratio) for ratio in pmod_ratios]


# ---- random: a seeded draw ------------------------------------------------------------------


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


# ---- FastV: the attention a token receives ------------------------------------------------

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


def fastv_attention_scores(
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
    mask, so any attention backend works. ``score="last"``: the row of the query at ``query_end``
    (batch,); ``"mean"``: the mean of the rows of every real query up to ``query_end``.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, seq, _ = queries.shape
    head_dim = attention.head_dim
    q = (
        queries.view(batch, seq, -1, head_dim).transpose(1, 2).float()
    )  # (batch, heads, seq, head_dim)
    k = (
        keys.view(batch, seq, -1, head_dim).transpose(1, 2).float()
    )  # (batch, kv_heads, seq, head_dim)
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
    logits = (
        torch.matmul(q, k.transpose(-1, -2)) * attention.scaling
    )  # (batch, heads, queries, seq)
    allowed = valid[:, None, :] & (
        index[None, None, :] <= query_index[:, :, None]
    )  # (batch, queries, seq)
    if sliding_window is not None:
        allowed = allowed & (query_index[:, :, None] - index[None, None, :] < sliding_window)
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    received = probs.mean(dim=1)  # (batch, queries, seq): mean over heads
    return (received * query_weight[:, :, None]).sum(dim=1)


# ---- pool: fewer vision tokens before the language model -----------------------------------


def pool_grid(num_vision: int, tokens: int) -> tuple[int, int]:
    """(rows, columns) of the pooled grid: ``tokens`` = rows * columns cells, as square as it
    gets, over an image's side x side patch grid of ``num_vision`` tokens."""
    side = math.isqrt(num_vision)
    if side * side != num_vision:
        raise MethodError(
            f"pool averages an image's square patch grid, but an image here has {num_vision} vision tokens "
            "(pool works with LLaVA-1.5 layouts and vision_feature_select_strategy 'default')"
        )
    if not 1 <= tokens <= num_vision:
        raise MethodError(
            f"--pool-tokens must be between 1 and the {num_vision} vision tokens of an image, got {tokens}"
        )
    pairs = [
        (rows, tokens // rows)
        for rows in range(1, side + 1)
        if tokens % rows == 0 and tokens // rows <= side
    ]
    if not pairs:
        near = [n for n in pool_token_counts(num_vision) if abs(n - tokens) <= 4]
        raise MethodError(
            f"{tokens} pooled tokens do not tile a {side} x {side} patch grid (rows x columns, each at most {side}); "
            f"try {', '.join(map(str, near))}"
        )
    return min(pairs, key=lambda pair: (abs(pair[0] - pair[1]), pair[0]))


def pool_token_counts(num_vision: int) -> list[int]:
    """Every pooled count that tiles the patch grid of an image of ``num_vision`` tokens."""
    side = math.isqrt(num_vision)
    return sorted({rows * columns for rows in range(1, side + 1) for columns in range(1, side + 1)})


def pool_features(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(images, V, hidden) -> (images, rows * columns, hidden): the mean of each grid cell, in
    reading order."""
    images, num_vision, hidden = features.shape
    side = math.isqrt(num_vision)
    maps = features.transpose(1, 2).reshape(images, hidden, side, side)
    return F.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)


def pool_image_placeholders(
    inputs: dict, image_token_id: int, tokens: int, pad_token_id: int, padding_side: str
) -> dict:
    """Processor outputs with every image's run of placeholder tokens cut to ``tokens`` (the
    pooled count), re-padded on ``padding_side``; other entries are kept as they are."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    rows = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        ids = ids[mask.bool()]
        is_image = ids == image_token_id
        starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
        run = torch.cumsum(starts.long(), dim=0)  # which image run a token belongs to
        first = torch.zeros(int(run.max()) + 1, dtype=torch.long, device=ids.device)
        first[run[starts]] = torch.nonzero(starts).view(-1)
        place = torch.arange(len(ids), device=ids.device) - first[run]  # index inside its run
        rows.append(ids[~is_image | (place < tokens)])
    width = max(len(row) for row in rows)
    new_ids = torch.full(
        (len(rows), width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device
    )
    new_mask = torch.zeros(
        (len(rows), width), dtype=attention_mask.dtype, device=attention_mask.device
    )
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        new_ids[index, span] = row
        new_mask[index, span] = 1
    pooled = dict(inputs)
    pooled["input_ids"], pooled["attention_mask"] = new_ids, new_mask
    return type(inputs)(pooled) if not isinstance(inputs, dict) else pooled
