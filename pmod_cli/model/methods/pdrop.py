"""``pdrop``: PyramidDrop (Xing et al., CVPR 2025). The layers are cut into stages at boundaries
b_1 < b_2 < ... (default 8/16/24 of 32 layers: the quarters of the model's depth); stage s keeps
floor(V * lambda^s) of a sample's V vision tokens, chosen among the ones stage s-1 kept (nested).
At each boundary b the first layer of the new stage ranks them by its own attention, recomputed
for the query rows only from its input: its input_layernorm, q_proj / k_proj (and per-head q/k
norms where the model has them) and RoPE, grouped-query heads repeated, softmax in fp32 over the
tokens still present (causal and padding masked), mean over heads and over the query rows. The
query row is the last prompt token at inference; with labels (training), the token before each
answer span. Text is never dropped; no router, no reweighting. Kept tokens keep their original
rotary positions. docs/baselines.md says what follows the official code and what does not."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cache import pmod_cache_layer
from ..selection import keep_top
from .attention import prompt_ends, row_attention
from .base import MethodError, TokenMethod, register_method

PDROP_POSITIONS = ("keep", "reindex")
# families whose positions reindex cannot renumber: name -> why
PDROP_REINDEX_REFUSED = {
    name: "its rotary positions are 3-D (time, height, width), which a count cannot renumber"
    for name in ("qwen2_5_vl", "qwen3_vl")
}
IGNORE_INDEX = -100  # labels of tokens that are not trained on (HF's convention)


@register_method
@dataclass(frozen=True)
class PyramidDrop(TokenMethod):
    """Options: ``layers`` (the stage boundaries, ``/``-separated: ``layers=8/16/24``; default
    the quarters of the model's depth, 8/16/24 for 32 layers), ``ratio`` (lambda in (0, 1]: stage
    s keeps floor(V * lambda^s)), ``positions`` (``keep``: the original rotary positions;
    ``reindex``: the official code's contiguous renumbering of the tokens still present, from
    the first stage boundary on; 1-D RoPE only)."""

    name = "pdrop"
    title = (
        "PyramidDrop (Xing et al., 2025) keeps floor(V * lambda^s) vision tokens in stage s, "
        "ranked at each stage boundary by that layer's attention from the last prompt token"
    )
    knob = "ratio"
    trains = True
    layers: str | None = None
    ratio: float = 0.5
    positions: str = "keep"

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise MethodError(f"pdrop's ratio (lambda) must be in (0, 1], got {self.ratio}")
        if self.positions not in PDROP_POSITIONS:
            raise MethodError(
                f"unknown pdrop positions {self.positions!r}; choose one of {', '.join(PDROP_POSITIONS)}"
            )
        if self.layers is not None:
            object.__setattr__(self, "layers", "/".join(map(str, _parse_layers(self.layers))))

    @property
    def label(self) -> str:
        at = "" if self.layers is None else f" at {self.layers}"
        return f"PDrop lambda={self.ratio:.4g}{at}"

    def boundaries(self, num_layers: int) -> list[int]:
        """The first layer of each stage after the first (default: L/4, L/2, 3L/4)."""
        if self.layers is None:
            return [num_layers * quarter // 4 for quarter in (1, 2, 3)]
        return list(_parse_layers(self.layers))

    def check_family(self, family) -> None:
        super().check_family(family)
        if self.positions == "reindex" and family.name in PDROP_REINDEX_REFUSED:
            raise MethodError(
                f"pdrop's positions=reindex does not run on {family.title}: "
                f"{PDROP_REINDEX_REFUSED[family.name]}; use positions=keep"
            )

    def check(self, num_layers: int, vision_tokens: int | None = None) -> None:
        bounds = self.boundaries(num_layers)
        if self.layers is None and num_layers < 4:
            raise MethodError(
                f"pdrop's default stages (layers L/4, L/2, 3L/4) need at least 4 layers; give "
                f"layers=... (e.g. layers=1) for this {num_layers}-layer model"
            )
        if bounds[0] < 1 or bounds[-1] > num_layers - 1:
            raise MethodError(
                f"pdrop's layers {'/'.join(map(str, bounds))} are out of range for a "
                f"{num_layers}-layer model: each boundary is between 1 and {num_layers - 1}"
            )

    # ---- the plan -------------------------------------------------------------------------

    def stage(self, layer_index: int, num_layers: int) -> int:
        """The stage of a layer: 0 before the first boundary, s from boundary b_s on."""
        return bisect.bisect_right(self.boundaries(num_layers), layer_index)

    def layer_modes(self, pmod_ratios: Sequence[float]) -> list[str]:
        first = self.boundaries(len(pmod_ratios))[0]
        return ["subset" if i >= first else "dense" for i in range(len(pmod_ratios))]

    def kept_vision_tokens(self, pmod_ratios: Sequence[float], num_vision: int) -> list[int]:
        layers = len(pmod_ratios)
        return [pdrop_kept(num_vision, self.ratio, self.stage(i, layers)) for i in range(layers)]

    def settings(self, num_vision: int) -> list[TokenMethod]:
        return [self.replace(ratio=step / 100) for step in range(1, 100)]

    def layer_ratio(self, layer) -> float:
        return self.ratio ** self.stage(
            layer.self_attn.layer_idx, layer.self_attn.config.num_hidden_layers
        )

    def ranking_flops(self, shape, num_vision: int, num_text: int) -> int:
        """FLOPs of the ranking at each boundary of a one-prompt prefill: q of the query row, k
        of the tokens still present (T + the previous stage's vision tokens), and the row's
        query-key products (no values: only the softmax is needed). A boundary with no vision
        token left to rank does no work."""
        text = shape.text
        bounds = self.boundaries(text.num_layers)
        flops = 0
        for stage in range(1, len(bounds) + 1):
            candidates = pdrop_kept(num_vision, self.ratio, stage - 1)
            if candidates == 0:
                continue
            present = num_text + candidates
            flops += 2 * text.hidden_size * text.q_dim  # the row's q
            flops += 2 * present * text.hidden_size * text.kv_dim  # every present token's k
            flops += 2 * present * text.q_dim  # the row against every present key, all heads
        return flops

    # ---- on a model -----------------------------------------------------------------------

    def install(self, model, vision_tokens: int | None) -> None:
        if self.positions == "reindex":  # RoPE at the renumbered positions, the model's own
            rotary = model.model.language_model.rotary_emb
            for layer in model.pmod_family.decoder_layers(model):
                object.__setattr__(layer, "pdrop_rotary", rotary)

    def kept_positions(self, layer, keep, position_ids, position_embeddings, cache):
        if self.positions == "keep":
            return position_ids, position_embeddings
        return renumbered(layer, keep, position_embeddings, cache)

    def select(self, layer, routing, hidden_states, position_embeddings):
        """The stage's kept tokens: ranked here if this layer is a boundary, else the ones the
        stage's boundary layer chose. Each stage's choice is kept for the forward call, so a
        layer re-run by gradient checkpointing gets the same set."""
        num_layers = layer.self_attn.config.num_hidden_layers
        stage = self.stage(layer.self_attn.layer_idx, num_layers)
        stages = routing.method_state.setdefault(self.name, {})  # stage -> (keep, scores)
        if stage not in stages:
            if layer.self_attn.layer_idx != self.boundaries(num_layers)[stage - 1]:
                raise RuntimeError(
                    f"pdrop layer {layer.self_attn.layer_idx} runs before its stage's boundary ranked"
                )
            valid = routing.token_valid
            present = stages[stage - 1][0] if stage > 1 else valid
            if self.positions == "reindex":  # ranked at the positions the tokens have there
                _, position_embeddings = renumbered(layer, present, position_embeddings, None)
            stages[stage] = self._rank(layer, routing, hidden_states, position_embeddings, present)
        return stages[stage]

    def _rank(self, layer, routing, hidden_states, position_embeddings, present):
        """(keep, scores): the top floor(V * lambda^s) of the present vision tokens by the
        attention the query rows give them in this layer."""
        valid = routing.token_valid
        vision = routing.vision_mask & valid
        candidates = vision & present
        if not candidates.any():  # a decoding step: the kept set is already in the cache
            return present, torch.zeros(valid.shape, device=valid.device)
        rows, row_valid = query_rows(routing)
        with torch.no_grad():  # the ranking is detached, as in the official code
            scores = row_attention(
                layer, hidden_states, position_embeddings, present, rows, row_valid
            )
        stage = self.stage(layer.self_attn.layer_idx, layer.self_attn.config.num_hidden_layers)
        keep_count = torch.tensor(
            [pdrop_kept(int(n), self.ratio, stage) for n in vision.sum(dim=1)],
            device=valid.device,
        )
        # a sample with no query row (a training sample without an answer) drops nothing
        keep_count = torch.where(row_valid.any(dim=1), keep_count, candidates.sum(dim=1))
        keep = keep_top(scores, candidates, valid & (~vision | candidates), keep_count)
        return keep, scores


def renumbered(layer, keep, position_embeddings, cache):
    """(positions, (cos, sin)) of ``keep`` (batch, seq) numbered contiguously per sample, after
    what ``layer``'s cache already holds (as the official code renumbers after each drop, and
    shifts decoding positions by what was dropped): the k-th kept token of a call is at the
    cache's next position + k. RoPE from the model's own rotary embedding at those positions."""
    start = torch.zeros(keep.shape[0], dtype=torch.long, device=keep.device)
    if cache is not None:
        cached = pmod_cache_layer(cache, layer.self_attn.layer_idx)
        if cached.slot_positions is not None:
            held = torch.where(cached.slot_valid, cached.slot_positions, -1)
            start = held.max(dim=1).values.to(keep.device) + 1
    positions = (start[:, None] + keep.long().cumsum(dim=1) - 1).clamp(min=0)
    cos, sin = layer.pdrop_rotary(position_embeddings[0], positions)
    return positions, (cos, sin)


def pdrop_kept(num_vision: int, ratio: float, stage: int) -> int:
    """Vision tokens stage ``stage`` keeps: floor(V * lambda^stage), as the official int()."""
    # the small epsilon keeps e.g. 100 * 0.3**2 = 8.999999999999998 from flooring to 8
    return int(math.floor(num_vision * ratio**stage + 1e-9))


def _parse_layers(layers: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(layers, str):
        pieces = [piece.strip() for piece in layers.replace("+", "/").split("/")]
    else:
        pieces = list(layers)
    try:
        bounds = tuple(int(piece) for piece in pieces)
    except (TypeError, ValueError):
        raise MethodError(
            f"pdrop's layers are stage boundaries separated by '/', e.g. layers=8/16/24; got {layers!r}"
        ) from None
    if not bounds or any(
        later <= earlier for earlier, later in zip(bounds, bounds[1:], strict=False)
    ):
        raise MethodError(
            f"pdrop's layers must be increasing stage boundaries, e.g. layers=8/16/24; got {layers!r}"
        )
    return bounds


# ---- the ranking --------------------------------------------------------------------------


def query_rows(routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, rows) long positions of the query rows and (batch, rows) bool: which are real.

    With labels (training): every token just before an answer span (labels[i] trained on,
    labels[i-1] not); without: each sample's last prompt token."""
    valid = routing.token_valid
    labels = routing.labels
    if labels is None:
        return prompt_ends(valid, routing.prompt_length)[:, None], torch.ones_like(valid[:, :1])
    if labels.shape != valid.shape:
        raise ValueError(
            f"pdrop ranks with the tokens before each answer span, but labels of shape "
            f"{tuple(labels.shape)} do not line up with the {tuple(valid.shape)} input tokens"
        )
    trained = (labels != IGNORE_INDEX) & valid
    before = torch.zeros_like(trained)
    before[:, :-1] = trained[:, 1:] & ~trained[:, :-1] & valid[:, :-1]
    count = before.sum(dim=1)  # (batch,)
    width = max(int(count.max()), 1)
    rows = torch.sort(before.to(torch.uint8), dim=1, descending=True, stable=True).indices
    rows = rows[:, :width]
    row_valid = torch.arange(width, device=valid.device)[None, :] < count[:, None]
    return rows, row_valid
