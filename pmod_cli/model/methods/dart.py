"""``dart``: DART (Wen et al., EMNLP 2025), duplication-aware reduction of tokens. Layers 0..K-1
process every token; before layer K runs at prefill, each sample keeps, of its one image's V
vision tokens:

1. pivots: the ``image_pivots`` image tokens and the ``text_pivots`` prompt tokens after the image
   with the largest L1 norm of layer K-1's keys (after RoPE, the KV heads' keys concatenated);
2. duplicates dropped: for each pivot in turn (in the order of their positions), the
   TOKEN_TOPK image tokens still unpicked whose hidden states (layer K-1's output under the
   model's final RMSNorm) are the LEAST cosine-similar to the pivot's;
3. kept: the image pivots and every picked token, p_img + (p_img + p_txt) * TOKEN_TOPK of them,
   TOKEN_TOPK = floor(min(MAX, V - p_img) / (p_img + p_txt)), MAX = ``max_tokens`` or V * (1 - R).

Layers K..L-1 process the kept image tokens and every text token, the same set in every layer and
in their KV caches, at their original positions. No router, no reweighting. docs/baselines.md
says what follows the official code and what pmod chose where it is silent."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..selection import by_score
from .attention import text_after_image
from .base import MethodError, TokenMethod, register_method
from .single_image import check_one_image, refuse_video_hook

# families DART does not run on: name -> why (a plug-in family refuses through unsupported_methods)
DART_REFUSED_FAMILIES = {
    "qwen3_vl": "its attention normalises k per head after k_proj, the keys DART ranks by"
}


@register_method
@dataclass(frozen=True)
class DART(TokenMethod):
    """Options: ``layer`` (K, at least 1: layers 0..K-1 see every token, the choice uses layer
    K-1's keys and output), ``ratio`` (R in [0, 1], the official ``reduction_ratio``: the picks'
    budget is V * (1 - R)), ``max_tokens`` (the official ``max_num_trunction`` /
    ``retain_token_num_for_llava_next``: the picks' budget as a count, instead of R),
    ``image_pivots`` / ``text_pivots`` (p_img at least 1, p_txt)."""

    name = "dart"
    top_scored = False  # pivots by key norm, then the least similar: no one ranking
    title = (
        "DART (Wen et al., 2025) keeps, from layer K on, pivot tokens (layer K-1's key L1 norm) "
        "and the image tokens least similar to them (cosine of normed hidden states)"
    )
    knob = "ratio"
    images_per_sample = 1  # the official code's one image span; video is refused too
    # a setting that keeps some of the tiny test models' 8 to 80 vision tokens beyond the pivots
    example = "dart:ratio=0.4,image_pivots=2,text_pivots=2"
    layer: int = 2
    ratio: float = 0.778
    max_tokens: int | None = None
    image_pivots: int = 4
    text_pivots: int = 4

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise MethodError(
                f"dart's layer K must be at least 1 (it chooses with layer K-1's keys), got {self.layer}"
            )
        if not 0.0 <= self.ratio <= 1.0:
            raise MethodError(
                f"dart's ratio R is the fraction of vision tokens dropped, in [0, 1]; got {self.ratio}"
            )
        if self.max_tokens is not None and self.max_tokens < 0:
            raise MethodError(f"dart's max_tokens must be at least 0, got {self.max_tokens}")
        if self.image_pivots < 1 or self.text_pivots < 0:
            raise MethodError(
                "dart needs image_pivots >= 1 and text_pivots >= 0, got "
                f"{self.image_pivots} and {self.text_pivots}"
            )

    @property
    def label(self) -> str:
        budget = f"R={self.ratio:.4g}" if self.max_tokens is None else f"max {self.max_tokens}"
        pivots = (self.image_pivots, self.text_pivots)
        extra = "" if pivots == (4, 4) else f", pivots {pivots[0]}+{pivots[1]}"
        return f"DART K={self.layer} {budget}{extra}"

    def check(self, num_layers: int, vision_tokens: int | None = None) -> None:
        if self.layer > num_layers - 1:
            raise MethodError(
                f"dart's layer K={self.layer} is out of range for a {num_layers}-layer model: "
                f"K is between 1 and {num_layers - 1}"
            )

    def check_family(self, family) -> None:
        super().check_family(family)
        refused = DART_REFUSED_FAMILIES.get(family.name)
        if refused:
            raise MethodError(f"dart does not run on {family.title}: {refused}")

    # ---- the plan -------------------------------------------------------------------------

    def layer_modes(self, pmod_ratios: Sequence[float]) -> list[str]:
        return ["subset" if i >= self.layer else "dense" for i in range(len(pmod_ratios))]

    def kept_vision_tokens(self, pmod_ratios: Sequence[float], num_vision: int) -> list[int]:
        kept = self.kept(num_vision)
        return [num_vision if i < self.layer else kept for i in range(len(pmod_ratios))]

    def picks_per_pivot(self, num_vision: int) -> int:
        """TOKEN_TOPK: the image tokens each pivot picks, for an image of ``num_vision`` tokens.

        MAX is capped at V - p_img (the official LLaVA-NeXT guard, here for every family: the
        candidates never run out); the small epsilon keeps V * (1 - R) = 8 * k from flooring
        below k when R came from ``settings``."""
        budget = num_vision * (1.0 - self.ratio) if self.max_tokens is None else self.max_tokens
        budget = min(budget, num_vision - min(self.image_pivots, num_vision))
        return int(math.floor(budget / (self.image_pivots + self.text_pivots) + 1e-6))

    def kept(self, num_vision: int) -> int:
        """Vision tokens kept from layer K on: p_img + (p_img + p_txt) * TOKEN_TOPK (at most V)."""
        pivots = self.image_pivots + self.text_pivots
        return min(self.image_pivots, num_vision) + pivots * self.picks_per_pivot(num_vision)

    def settings(self, num_vision: int) -> list[TokenMethod]:
        """Every R that gives another TOKEN_TOPK, 0 up to (V - p_img) / (p_img + p_txt)."""
        if self.max_tokens is not None:
            raise MethodError("--match-tflops chooses dart's ratio itself; drop max_tokens=")
        pivots = self.image_pivots + self.text_pivots
        most = (num_vision - min(self.image_pivots, num_vision)) // pivots
        return [self.replace(ratio=1.0 - picks * pivots / num_vision) for picks in range(most + 1)]

    def layer_ratio(self, layer) -> float:
        return 1.0 - self.ratio

    def ranking_flops(self, shape, num_vision: int, num_text: int) -> int:
        """FLOPs of the choice on a one-image prefill of V + T tokens (elementwise work, no
        matmul): RoPE on layer K-1's keys (3 per element) and their L1 norms (2); the final
        RMSNorm of layer K-1's output (4 per element); and in each of the p_img + p_txt rounds,
        the cosine of the pivot against every token (a dot product and both squared norms, 6 per
        element of the hidden size)."""
        text = shape.text
        tokens = num_vision + num_text
        rounds = self.image_pivots + self.text_pivots
        per_token = 5 * text.kv_dim + 4 * text.hidden_size + 6 * rounds * text.hidden_size
        return tokens * per_token

    # ---- on a model -----------------------------------------------------------------------

    def install(self, model, vision_tokens: int | None) -> None:
        layers = model.pmod_family.decoder_layers(model)
        # a reference to the final RMSNorm, not a submodule: the layer's state dict stays as it is
        object.__setattr__(layers[self.layer], "dart_final_norm", model.model.language_model.norm)
        model._pmod_method_hooks.append(refuse_video_hook(model, self.name))

    def ranking_layers(self, num_layers: int) -> set[int]:
        return {self.layer - 1}

    def rank(self, layer, projections: dict, position_embeddings, routing) -> None:
        """Layer K-1: the L1 norm of each token's keys after RoPE (``routing.ranked_scores``)."""
        routing.ranked_scores = key_l1_norms(
            projections["k"].detach(), position_embeddings, layer.self_attn.head_dim
        )

    def select(self, layer, routing, hidden_states, position_embeddings):
        """Layer K chooses, per sample, from its input (layer K-1's output) and layer K-1's key
        norms; the layers after it run the same set."""
        valid = routing.token_valid
        if routing.ranked_keep is not None:  # layer K chose: the layers after it run its set
            return routing.ranked_keep, routing.ranked_scores
        vision = routing.vision_mask & valid
        if not vision.any():  # a decoding step: the kept set is already in the cache
            return valid, torch.zeros(valid.shape, device=valid.device)
        if routing.ranked_scores is None or layer.self_attn.layer_idx != self.layer:
            raise RuntimeError(
                f"dart layer {layer.self_attn.layer_idx} got vision tokens that layer "
                f"{self.layer - 1} did not rank"
            )
        check_one_image(vision, self.name)
        with torch.no_grad():
            normed = layer.dart_final_norm(hidden_states).float()  # (batch, seq, hidden)
            chosen = dart_choice(
                routing.ranked_scores,
                normed,
                vision,
                text_after_image(vision, valid, routing.prompt_length),
                self.image_pivots,
                self.text_pivots,
                torch.tensor([self.picks_per_pivot(int(n)) for n in vision.sum(dim=1)]),
            )
        routing.ranked_keep = (valid & ~vision) | chosen
        return routing.ranked_keep, routing.ranked_scores


def key_l1_norms(keys: torch.Tensor, position_embeddings, head_dim: int) -> torch.Tensor:
    """(batch, seq) float32: the L1 norm of each token's keys after RoPE, over every KV head.

    ``keys`` (batch, seq, kv_heads * head_dim) is k_proj's output, before RoPE. The official code
    reads the attention's post-RoPE keys (repeated to every query head in eager / sdpa, which
    scales every norm alike); recomputing them here lets any attention backend run."""
    from transformers.models.llama.modeling_llama import rotate_half

    batch, seq, _ = keys.shape
    k = keys.view(batch, seq, -1, head_dim).float()  # (batch, seq, kv_heads, head_dim)
    cos, sin = (part.float().unsqueeze(2) for part in position_embeddings)  # (b, seq, 1, d)
    rotated = k * cos + rotate_half(k) * sin
    return rotated.abs().sum(dim=(2, 3))


def dart_choice(
    key_norms: torch.Tensor,
    normed: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    image_pivots: int,
    text_pivots: int,
    picks: torch.Tensor,
) -> torch.Tensor:
    """(batch, seq) bool: the image tokens each sample keeps.

    ``key_norms`` (batch, seq) rank the pivots among the ``image`` tokens and the ``text`` tokens
    (both (batch, seq) bool); ``normed`` (batch, seq, hidden) fp32 are the hidden states the
    cosines compare; ``picks`` (batch,) is each sample's TOKEN_TOPK. Ties go to the earlier token.
    The pivots take their turns in the order of their positions (the official code iterates a
    Python set); with fewer text tokens than p_txt, the turns cycle over the pivots there are."""
    batch, seq = image.shape
    device = image.device
    picks = picks.to(device)
    index = torch.arange(seq, device=device).expand(batch, seq)
    image_pivot = by_score(key_norms, image, torch.full_like(picks, image_pivots), None)
    text_pivot = by_score(key_norms, text, torch.full_like(picks, text_pivots), None)
    pivots = image_pivot | text_pivot
    order = torch.sort(torch.where(pivots, index, seq), dim=1).values  # pivots first, in order
    turns = pivots.sum(dim=1).clamp(min=1)  # (batch,)
    rows = torch.arange(batch, device=device)
    chosen, candidates = image_pivot, image & ~image_pivot
    for turn in range(image_pivots + text_pivots):
        pivot = order[rows, turn % turns].clamp(max=seq - 1)  # (batch,): this turn's pivot
        cosine = F.cosine_similarity(normed[rows, pivot][:, None, :], normed, dim=-1)
        picked = by_score(-cosine, candidates, picks, None)  # the least similar candidates
        chosen, candidates = chosen | picked, candidates & ~picked
    return chosen
