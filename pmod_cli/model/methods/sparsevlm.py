"""``sparsevlm``: SparseVLM v1.5 (Zhang et al., ICML 2025), text-guided pruning with token
recycling. At prefill, for each sample's one image of V vision tokens:

1. raters: from the input embeddings (layer 0's input), m = softmax over the prompt's text after the
   image of (vision x text), averaged over the vision tokens; the raters are the text tokens with m
   above its mean;
2. at each sparse layer l_s (default 2/6/15 of 32 layers), which runs on the tokens still present,
   the raters' attention in it (recomputed in fp32 from its own q/k for the rater rows, mean over
   heads and raters) ranks the present vision tokens, and the top min(N_s, present - 1) stay;
3. recycling: of the pruned ones, the top int(0.3 * pruned) + 1 by that score are clustered with
   DPC-kNN on the sparse layer's output (int(n / 10) + 1 clusters) and each cluster's average
   takes its centre's place (and position) from layer l_s + 1 on.

N_s are the official v1.5 counts for LLaVA-1.5's 576 tokens (``budget`` 192: 300/200/110),
scaled to the image's V; ``scale`` multiplies them (the knob ``--match-tflops`` solves). Text is
never pruned; no router, no reweighting; inference only (the official training branch prunes
nothing). docs/baselines.md says what follows the official code and what pmod chose."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..selection import by_score, keep_top
from .attention import row_attention, text_after_image
from .base import MethodError, TokenMethod, register_method
from .single_image import check_one_image, refuse_video_hook

# the official v1.5 counts after each of its three sparse layers, for 576 vision tokens
# (``score.py``; 96 is the main branch's)
SPARSEVLM_BUDGETS = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
REFERENCE_VISION = 576  # LLaVA-1.5's vision tokens, which the counts were set for
REFERENCE_LAYERS = (2, 6, 15)  # the sparse layers of the official 32-layer model
REFERENCE_DEPTH = 32
RECYCLED_SHARE = 0.3  # of the pruned tokens, the best-rated share that is recycled
CLUSTER_SIZE = 10  # recycled tokens per cluster


@register_method
@dataclass(frozen=True)
class SparseVLM(TokenMethod):
    """Options: ``budget`` (the official count table: 192, 128, 96 or 64), ``scale`` (a factor
    on its counts, > 0), ``layers`` (the sparse layers, ``/``-separated; default 2/6/15 scaled to
    the model's depth), ``recycle`` (token recycling, default true)."""

    name = "sparsevlm"
    title = (
        "SparseVLM (Zhang et al., 2025) prunes vision tokens after layers 2/6/15 by the attention "
        "of text raters, and recycles the best pruned ones as cluster averages"
    )
    knob = "scale"
    images_per_sample = 1  # the official code's one image span; video is refused too
    top_scored = False  # a recycled token takes a pruned token's place
    budget: int = 192
    scale: float = 1.0
    layers: str | None = None
    recycle: bool = True

    def __post_init__(self) -> None:
        if self.budget not in SPARSEVLM_BUDGETS:
            budgets = ", ".join(map(str, SPARSEVLM_BUDGETS))
            raise MethodError(f"sparsevlm's budget is one of {budgets}; got {self.budget}")
        if not self.scale > 0:
            raise MethodError(f"sparsevlm's scale must be above 0, got {self.scale}")
        if self.layers is not None:
            object.__setattr__(self, "layers", "/".join(map(str, _parse_layers(self.layers))))

    @property
    def label(self) -> str:
        scale = "" if self.scale == 1.0 else f" x{self.scale:.4g}"
        recycle = "" if self.recycle else ", no recycling"
        return f"SparseVLM {self.budget}{scale}{recycle}"

    def sparse_layers(self, num_layers: int) -> list[int]:
        """The layers after which tokens are pruned: ``layers``, or 2/6/15 of 32 scaled to the
        depth (floor of l * L / 32, each at least one above the one before)."""
        if self.layers is not None:
            return list(_parse_layers(self.layers))
        chosen: list[int] = []
        for layer in REFERENCE_LAYERS:
            chosen.append(
                max(layer * num_layers // REFERENCE_DEPTH, chosen[-1] + 1 if chosen else 0)
            )
        return chosen

    def check(self, num_layers: int, vision_tokens: int | None = None) -> None:
        layers = self.sparse_layers(num_layers)
        if layers[-1] > num_layers - 2:
            raise MethodError(
                f"sparsevlm's sparse layers {'/'.join(map(str, layers))} do not fit a "
                f"{num_layers}-layer model: each must be below its last layer ({num_layers - 1}); "
                "give layers=... (e.g. layers=0/1)"
            )

    # ---- the plan -------------------------------------------------------------------------

    def counts(self, num_vision: int) -> list[int]:
        """N_s: the tokens each sparse layer keeps of an image of ``num_vision`` (before the
        cap at present - 1): the budget's counts times V / 576 times ``scale``, rounded."""
        factor = self.scale * num_vision / REFERENCE_VISION
        return [int(round(count * factor)) for count in SPARSEVLM_BUDGETS[self.budget]]

    def stages(self, num_vision: int, num_layers: int | None = None) -> list[tuple[int, int]]:
        """(kept, recycled) after each sparse layer, for an image of ``num_vision`` tokens."""
        present, stages = num_vision, []
        count_list = self.counts(num_vision)
        if num_layers is not None:
            count_list = count_list[: len(self.sparse_layers(num_layers))]
        for count in count_list:
            kept = min(count, present - 1) if present > 0 else 0
            merged = recycled_clusters(present - kept) if self.recycle and present > 0 else 0
            stages.append((kept, merged))
            present = kept + merged
        return stages

    def layer_modes(self, pmod_ratios: Sequence[float]) -> list[str]:
        first = self.sparse_layers(len(pmod_ratios))[0]
        return ["subset" if i >= first else "dense" for i in range(len(pmod_ratios))]

    def kept_vision_tokens(self, pmod_ratios: Sequence[float], num_vision: int) -> list[int]:
        layers = len(pmod_ratios)
        present = [num_vision] + [kept + merged for kept, merged in self.stages(num_vision, layers)]
        bounds = self.sparse_layers(layers)
        return [present[sum(i > bound for bound in bounds)] for i in range(layers)]

    def settings(self, num_vision: int) -> list[TokenMethod]:
        """Scales from 0.01 up to the one at which the first count reaches V."""
        top = REFERENCE_VISION / SPARSEVLM_BUDGETS[self.budget][0]
        return [self.replace(scale=step / 100) for step in range(1, int(top * 100) + 1)]

    def layer_ratio(self, layer) -> float:
        """The share of LLaVA-1.5's 576 tokens present in ``layer``."""
        num_layers = layer.self_attn.config.num_hidden_layers
        kept = self.kept_vision_tokens([1.0] * num_layers, REFERENCE_VISION)
        return kept[layer.self_attn.layer_idx] / REFERENCE_VISION

    def ranking_flops(self, shape, num_vision: int, num_text: int) -> int:
        """The raters (vision x text products of the embeddings) and, at each sparse layer, q of
        the rater rows, k of the tokens present and their products. The raters are a data-
        dependent share of the text: counted as all of it (an upper bound). Clustering, a few
        dozen tokens, is left out."""
        text = shape.text
        flops = 2 * num_vision * num_text * text.hidden_size
        present = num_vision
        for kept, merged in self.stages(num_vision, text.num_layers):
            tokens = num_text + present
            flops += 2 * num_text * text.hidden_size * text.q_dim  # the raters' q
            flops += 2 * tokens * text.hidden_size * text.kv_dim  # every present token's k
            flops += 2 * num_text * tokens * text.q_dim  # the raters against every present key
            present = kept + merged
        return flops

    # ---- on a model -----------------------------------------------------------------------

    def install(self, model, vision_tokens: int | None) -> None:
        layers = model.pmod_family.decoder_layers(model)
        hook = layers[0].register_forward_pre_hook(self._choose_raters, with_kwargs=True)
        model._pmod_method_hooks += [hook, refuse_video_hook(model, self.name)]

    def _choose_raters(self, layer, args, kwargs) -> None:
        """Layer 0's pre-hook: the raters, from its input (the input embeddings)."""
        routing = kwargs.get("pmod_routing")
        if routing is None:
            return
        vision = routing.vision_mask & routing.token_valid
        if not vision.any():  # a decoding step: the kept set is already in the cache
            return
        check_one_image(vision, self.name)
        embeddings = args[0] if args else kwargs["hidden_states"]
        text = text_after_image(vision, routing.token_valid, routing.prompt_length)
        with torch.no_grad():
            raters = choose_raters(embeddings, vision, text)
        routing.method_state[self.name] = {"raters": raters}

    def rewrite_states(self, layer, routing, hidden_states):
        """After a sparse layer: its choice takes effect, the recycled averages in their places."""
        state = routing.method_state.get(self.name)
        if state is None or "ranked" not in state:
            return hidden_states
        keep, recycled = state.pop("ranked")
        if self.recycle:
            with torch.no_grad():
                hidden_states, centres = recycle_tokens(hidden_states, recycled, state["scores"])
            keep = keep | centres
        state["present"] = keep
        return hidden_states

    def select(self, layer, routing, hidden_states, position_embeddings):
        valid = routing.token_valid
        state = routing.method_state.get(self.name)
        if state is None:  # a decoding step: no vision token here
            if (routing.vision_mask & valid).any():
                raise RuntimeError(f"sparsevlm layer {layer.self_attn.layer_idx}: no raters chosen")
            return valid, torch.zeros(valid.shape, device=valid.device)
        present = state.get("present", valid)
        bounds = self.sparse_layers(layer.self_attn.config.num_hidden_layers)
        if layer.self_attn.layer_idx in bounds:
            stage = bounds.index(layer.self_attn.layer_idx)
            state["ranked"], state["scores"] = self._rank(
                layer, routing, hidden_states, position_embeddings, present, stage
            )
        return present, state.get("scores", torch.zeros(valid.shape, device=valid.device))

    def _rank(self, layer, routing, hidden_states, position_embeddings, present, stage):
        """((keep, recycled), scores): the vision tokens the layers after this one keep, and the
        pruned ones to recycle, by the raters' attention in this layer."""
        valid = routing.token_valid
        vision = routing.vision_mask & valid
        candidates = vision & present
        rows, row_valid = _rater_rows(routing.method_state[self.name]["raters"])
        with torch.no_grad():
            scores = row_attention(
                layer, hidden_states, position_embeddings, present, rows, row_valid
            )
        counts = torch.tensor(
            [self.counts(int(n))[stage] for n in vision.sum(dim=1)], device=valid.device
        )
        present_count = candidates.sum(dim=1)
        keep_count = torch.minimum(counts, (present_count - 1).clamp(min=0))
        # a sample with no rater (no text after its image) prunes nothing
        keep_count = torch.where(row_valid.any(dim=1), keep_count, present_count)
        keep = keep_top(scores, candidates, valid & (~vision | candidates), keep_count)
        pruned = candidates & ~keep
        pruned_count = pruned.sum(dim=1)
        recycled_count = torch.where(
            pruned_count > 0, (pruned_count * RECYCLED_SHARE).long() + 1, 0
        )
        recycled = by_score(scores, pruned, recycled_count, None)
        return (keep, recycled), scores


def recycled_clusters(pruned: int) -> int:
    """Clusters the recycling makes of ``pruned`` tokens: int(n / 10) + 1 of the n =
    int(0.3 * pruned) + 1 best rated (none when nothing is pruned)."""
    if pruned <= 0:
        return 0
    return int((int(pruned * RECYCLED_SHARE) + 1) / CLUSTER_SIZE) + 1


def choose_raters(embeddings: torch.Tensor, vision: torch.Tensor, text: torch.Tensor):
    """(batch, seq) bool: each sample's text tokens (of ``text``) whose share of the vision
    tokens' softmax over the text (vision x text products of ``embeddings``, fp32), averaged over
    the vision tokens, is above that share's mean."""
    raters = torch.zeros_like(text)
    for sample in range(embeddings.shape[0]):
        text_index = text[sample].nonzero().view(-1)
        if text_index.numel() == 0:
            continue
        vision_states = embeddings[sample, vision[sample]].float()
        text_states = embeddings[sample, text_index].float()
        share = (vision_states @ text_states.T).softmax(dim=-1).mean(dim=0)  # (text,)
        raters[sample, text_index[share > share.mean()]] = True
    return raters


def _rater_rows(raters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, rows) long positions of each sample's raters, padded, and which rows are real."""
    count = raters.sum(dim=1)
    width = max(int(count.max()), 1)
    rows = torch.sort(raters.to(torch.uint8), dim=1, descending=True, stable=True).indices
    rows = rows[:, :width]
    return rows, torch.arange(width, device=raters.device)[None, :] < count[:, None]


def recycle_tokens(hidden_states: torch.Tensor, recycled: torch.Tensor, scores: torch.Tensor):
    """(hidden states with each cluster's average in its centre's place, (batch, seq) bool
    centres): each sample's ``recycled`` tokens clustered with DPC-kNN, best-rated first (the
    official order, which settles ties: with one cluster every density is 1)."""
    rewritten = hidden_states.clone()
    centres = torch.zeros_like(recycled)
    for sample in range(hidden_states.shape[0]):
        index = recycled[sample].nonzero().view(-1)
        if index.numel() == 0:
            continue
        order = torch.sort(scores[sample, index], descending=True, stable=True).indices
        index = index[order]
        clusters = int(index.numel() / CLUSTER_SIZE) + 1
        centre, merged = cluster_and_merge(hidden_states[sample, index].float(), clusters)
        rewritten[sample, index[centre]] = merged.to(hidden_states.dtype)
        centres[sample, index[centre]] = True
    return rewritten, centres


def cluster_and_merge(points: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN as SparseVLM (after TCFormer) does it, on ``points`` (n, C): (the centres' rows
    (clusters,), each cluster's average (clusters, C)).

    Distances are Euclidean over sqrt(C); a point's density is exp(-mean squared distance to its
    ``clusters`` nearest (itself included)); its score is density times the distance to the
    nearest denser point (the largest distance for the densest); the top scores are the centres,
    and every point joins its nearest centre. Ties go to the earlier point: the official code's
    1e-6 noise on the density is left out, so a run is deterministic."""
    width = points.shape[-1]
    distance = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
    distance = distance / math.sqrt(width)
    nearest = torch.sort(distance, dim=-1).values[:, :clusters]
    density = (-(nearest**2).mean(dim=-1)).exp()  # (n,)
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = torch.where(denser, distance, distance.max()).min(dim=-1).values
    score = parent * density
    centre = torch.sort(score, descending=True, stable=True).indices[:clusters]
    assign = distance[centre].argmin(dim=0)  # (n,): the nearest centre
    assign[centre] = torch.arange(clusters, device=points.device)
    sums = torch.zeros(clusters, width, dtype=points.dtype, device=points.device)
    sums.index_add_(0, assign, points)
    sizes = torch.bincount(assign, minlength=clusters).to(points.dtype)
    return centre, sums / (sizes[:, None] + 1e-6)


def _parse_layers(layers: str | Sequence[int]) -> tuple[int, ...]:
    pieces = layers.split("/") if isinstance(layers, str) else list(layers)
    try:
        bounds = tuple(int(str(piece).strip()) for piece in pieces)
    except ValueError:
        raise MethodError(
            f"sparsevlm's layers are sparse layers separated by '/', e.g. layers=2/6/15; got {layers!r}"
        ) from None
    if (
        not bounds
        or len(bounds) > 3
        or bounds[0] < 0
        or any(b <= a for a, b in zip(bounds, bounds[1:], strict=False))
    ):
        raise MethodError(
            f"sparsevlm's layers are one to three increasing layers, e.g. layers=2/6/15; got {layers!r}"
        )
    return bounds
