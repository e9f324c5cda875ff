"""The p-MoD decoder layer: select, gather, run, scatter, reweight.

A converted model's decoder layers keep their HF class as a base (``LlamaDecoderLayer``,
``Qwen2DecoderLayer``, ``MistralDecoderLayer``) with ``PMoDLayerMixin`` in front, so parameter
names, output hooks (``output_hidden_states``) and gradient checkpointing stay those of
transformers. A dense layer (ratio 1) runs the untouched HF forward. A MoD layer:

1. select: the router scores every token; each sample keeps floor(n_vision * R) of its own
   vision tokens (top scores, or top weights: ``selection.py``; with ``budget="image"`` each
   image and video frame keeps floor(n * R) of its own) and every real text token;
2. gather: kept tokens, in their original order, with their original positions (RoPE);
3. run: attention over this layer's own cache and mask, then the MLP;
4. scatter: kept tokens go back to their places, skipped ones pass through;
5. reweight: w = 1 + f(r) scales the MLP branch (or the whole delta) of a kept vision token,
   and with STRing a skipped vision token becomes w * x.

Other token-reduction methods (``methods/``) run the same path with their own step 1
(``TokenMethod.select``) and no step 5: ``random`` draws the kept tokens at p-MoD's budget,
``fastv`` keeps the set that a dense layer before it ranked by attention (``TokenMethod.rank``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .cache import pmod_cache_layer
from .config import PMoDConfig
from .methods import TokenMethod, method_from_dict
from .methods.attention import sliding_window
from .router import WEIGHT_NORM_FNS, Router
from .routing import active_recorder
from .selection import SELECTION_RULES


@dataclass
class RoutingInputs:
    """What the model tells every layer about the tokens of one forward call."""

    vision_mask: torch.Tensor  # (batch, seq) bool: image- and video-feature positions
    token_valid: torch.Tensor  # (batch, seq) bool: real tokens (False for padding)
    # (batch, seq) long: the image / video frame of each vision token, -1 elsewhere (budget="image")
    vision_groups: torch.Tensor | None = None
    aux_losses: list[torch.Tensor] = field(default_factory=list)  # the layers' routing losses
    prompt_length: int | None = (
        None  # inside generate: the prompt's width (FastV ranks with its end)
    )
    # a ranking layer's choice (methods' ``rank``), read by the subset layers after it
    ranked_keep: torch.Tensor | None = None  # (batch, seq) bool: the tokens they process
    ranked_scores: torch.Tensor | None = None  # (batch, seq): the scores that chose them
    # (batch, seq) long: the call's labels (-100: not trained on), for a method that ranks with
    # the tokens before each answer span in training (pdrop); None when the call has none
    labels: torch.Tensor | None = None
    method_state: dict = field(default_factory=dict)  # a method's own state for this call


class PMoDLayerMixin:
    """Put in front of an HF decoder layer class; ``convert_layer`` installs it."""

    pmod_ratio: float = 1.0
    pmod_config: PMoDConfig | None = None
    # what the layer does (TokenMethod.layer_modes): dense, route (p-MoD's router) or subset
    token_mode: str = "dense"
    token_method: TokenMethod = method_from_dict(None)
    ranks_tokens: bool = False  # a dense layer that ranks the vision tokens for the layers after it

    @property
    def is_mod(self) -> bool:
        """A p-MoD layer (has a ratio below 1 and, with its own router, a router)."""
        return self.pmod_ratio < 1.0

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        pmod_routing: RoutingInputs | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.token_mode == "dense":
            layer_kwargs = dict(
                attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
            )
            if self.ranks_tokens and pmod_routing is not None:
                return self._dense_forward_ranking(
                    hidden_states, position_embeddings, pmod_routing, **layer_kwargs, **kwargs
                )
            return super().forward(
                hidden_states, position_embeddings=position_embeddings, **layer_kwargs, **kwargs
            )
        cache_kwarg = _cache_kwarg(type(self.self_attn))
        cache = kwargs.pop(cache_kwarg, None)
        return self._mod_forward(
            hidden_states,
            position_ids,
            cache,
            cache_kwarg,
            use_cache,
            position_embeddings,
            pmod_routing,
            **kwargs,
        )

    # ---- the MoD path -------------------------------------------------------------------

    @property
    def active_router(self) -> Router:
        return self.shared_router if self.pmod_config.shared_router else self.router

    def competing_tokens(self, vision: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(batch, seq) bool: the tokens that compete for this layer."""
        if self.pmod_config.routed_tokens == "vision":
            return vision
        if self.training and not self.pmod_config.masked_routing:
            return valid
        # system prompt and image compete; question, answer and generated tokens pass
        seq = vision.shape[1]
        index = torch.arange(seq, device=vision.device).expand_as(vision)
        last_image = torch.where(vision, index, -1).max(dim=1).values  # (batch,)
        return valid & (index <= last_image[:, None])

    def _normalised(self, logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """w = 1 + f(r) of the layer's weight norm, for every token."""
        cfg = self.pmod_config
        shift = cfg.softmax_shift if cfg.softmax_shift is not None else -cfg.alpha / 2
        return 1.0 + WEIGHT_NORM_FNS[cfg.weight_norm](logits, candidates, cfg.alpha, shift)

    def _token_weights(self, logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """w = 1 + f(r) for competing tokens, 1 for the others."""
        return torch.where(candidates, self._normalised(logits, candidates), 1.0)

    def _select(
        self,
        scores: torch.Tensor,
        candidates: torch.Tensor,
        valid: torch.Tensor,
        groups: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """(batch, seq) bool: the real tokens that do not compete, plus the winners of those that do.

        Competing tokens draw on budgets: one per sample (``groups`` None), or one per image and
        video frame (``groups``: their ids). A budget of n tokens keeps the floor(n * R) top-scored.
        ``scores`` are the router's fp32 scores; a rule that ranks weights (``weight``) gets them
        as the layer reweights with them, normalised in the model's ``dtype``.
        """
        if not self.training and self.pmod_config.inference_routing == "threshold":
            selected = candidates & (
                torch.sigmoid(scores.detach().float()) > self.pmod_config.routing_threshold
            )
            return (valid & ~candidates) | selected
        if groups is not None:  # one budget per image / video frame, top scores within each
            scores = scores.detach().float().masked_fill(~candidates, float("-inf"))
            rank, budget_size = rank_within_groups(scores, torch.where(candidates, groups, -1))
            keep_count = torch.floor(budget_size * self.pmod_ratio + 1e-9).long()  # (batch, seq)
            return (valid & ~candidates) | (candidates & (rank < keep_count))
        rule = SELECTION_RULES[self.pmod_config.selection]
        selected = rule(
            scores,
            candidates,
            self.vision_budget(candidates),
            lambda r: self._normalised(r.to(dtype), candidates),
        )
        return (valid & ~candidates) | selected

    def _budget_groups(self, routing: RoutingInputs) -> torch.Tensor | None:
        if self.pmod_config.budget == "sample" or not routing.vision_mask.any():
            return None  # one budget per sample, or no vision token (a generation step)
        if routing.vision_groups is None:  # a per-sample top-k here would silently change the rule
            raise RuntimeError(
                f"MoD layer {self.self_attn.layer_idx} has budget 'image' but got no vision groups: call the "
                "p-MoD model with the processor's outputs (or pass vision_groups with vision_mask)"
            )
        return routing.vision_groups

    def vision_budget(self, candidates: torch.Tensor) -> torch.Tensor:
        """(batch,) competing tokens each sample keeps: floor(n * R_l), p-MoD's (and random's) budget."""
        return torch.floor(candidates.sum(dim=1) * self.pmod_ratio + 1e-9).long()

    def _route(self, hidden_states: torch.Tensor, routing: RoutingInputs):
        """p-MoD's step 1: the router scores, the kept tokens and their weights w = 1 + f(r)."""
        vision, valid = routing.vision_mask, routing.token_valid
        router_input = (
            self.input_layernorm(hidden_states)
            if self.pmod_config.router_input == "normed"
            else hidden_states
        )
        scores = self.active_router(router_input)  # (batch, seq) fp32: what selection ranks
        logits = scores.to(hidden_states.dtype)  # the router's output as the released code has it
        candidates = self.competing_tokens(vision, valid)  # (batch, seq)
        weights = self._token_weights(logits, candidates)  # (batch, seq)
        groups = self._budget_groups(routing)
        keep = self._select(scores, candidates, valid, groups, logits.dtype)  # (batch, seq)
        if self.training and self.pmod_config.aux_loss_coef > 0 and candidates.any():
            # the router learns to predict its own top-k decision (gamma-MoD's auxiliary loss)
            routing_loss = F.binary_cross_entropy_with_logits(
                logits[candidates].float(), keep[candidates].float()
            )
            routing.aux_losses.append(self.pmod_config.aux_loss_coef * routing_loss)
        return keep, weights, scores

    def _mod_forward(
        self,
        hidden_states,
        position_ids,
        cache,
        cache_kwarg,
        use_cache,
        position_embeddings,
        routing,
        **kwargs,
    ):
        if routing is None:  # keeping every token here would silently run a dense layer
            raise RuntimeError(
                f"MoD layer {self.self_attn.layer_idx} got no routing inputs: call the p-MoD model (its forward "
                "pre-hook passes pmod_routing), not the language model or the layer on its own"
            )
        routed = self.token_mode == "route"

        # 1. select: p-MoD's router, or a baseline's choice (no reweighting: w = 1)
        if routed:
            keep, weights, logits = self._route(hidden_states, routing)  # (batch, seq) each
        else:
            hidden_states = self.token_method.rewrite_states(self, routing, hidden_states)
            keep, logits = self.token_method.select(
                self, routing, hidden_states, position_embeddings
            )
            weights = torch.ones(keep.shape, dtype=hidden_states.dtype, device=keep.device)
        _record(self, keep, routing.vision_mask, weights, logits)

        # 2. gather: kept tokens, in order, with their positions and RoPE
        if position_ids is None:  # Qwen-VL passes none (its RoPE is 3-D): the sequence index
            past = 0 if cache is None else cache.get_seq_length(self.self_attn.layer_idx)
            position_ids = torch.arange(past, past + keep.shape[1], device=keep.device)[None]
        position_ids, position_embeddings = self.token_method.kept_positions(
            self, keep, position_ids, position_embeddings, cache
        )
        subset = _gather_kept(keep, hidden_states, position_ids, position_embeddings)
        # 3. run, on this layer's own cache and mask
        attn_out, mlp_out = self._run_subset(
            subset, cache, cache_kwarg, use_cache, hidden_states.shape[1], **kwargs
        )
        # 4-5. reweight and scatter back (a baseline's kept tokens leave as the plain layer's)
        return self._reweight_and_scatter(hidden_states, subset, weights, attn_out, mlp_out, routed)

    def _run_subset(self, subset: KeptTokens, cache, cache_kwarg, use_cache, seq, **kwargs):
        """Attention over this layer's own cache and mask, then the MLP: (attn_out, mlp_out)."""
        batch, kept, _ = subset.states.shape
        past_valid = past_positions = None
        if cache is not None:
            cache_layer = pmod_cache_layer(cache, self.self_attn.layer_idx)
            past_valid, past_positions = cache_layer.slot_valid, cache_layer.slot_positions
            new_valid = (
                subset.slot_valid
                if subset.slot_valid is not None
                else torch.ones(batch, kept, dtype=torch.bool, device=subset.states.device)
            )
            cache_layer.record_slots(new_valid, subset.positions, seq)
        attn_mask = subset_attention_mask(
            self.self_attn.config._attn_implementation,
            subset.positions,
            subset.slot_valid,
            past_valid,
            past_positions,
            sliding_window(self.self_attn),
            subset.states.dtype,
        )
        attn_out, _ = self.self_attn(
            hidden_states=self.input_layernorm(subset.states),
            attention_mask=attn_mask,
            # no position_ids: RoPE comes from the kept tokens' own, and flash-attention would
            # read gappy positions as packed sequences
            use_cache=use_cache,
            position_embeddings=subset.rope,
            **{cache_kwarg: cache},
            **kwargs,
        )
        mlp_out = self.mlp(self.post_attention_layernorm(subset.states + attn_out))
        return attn_out, mlp_out  # (batch, kept, hidden) each

    def _reweight_and_scatter(self, hidden_states, subset, weights, attn_out, mlp_out, routed):
        """Kept tokens' outputs (reweighted) back in their places; skipped tokens pass through
        (times w with STRing)."""
        kept_states = subset.states
        after_attn = kept_states + attn_out
        kept_weights = weights.gather(1, subset.index).unsqueeze(-1)  # (batch, kept, 1)
        if self.pmod_config.reweight == "mlp" or not routed:
            kept_out = after_attn + kept_weights * mlp_out
        else:
            kept_out = kept_states + kept_weights * (attn_out + mlp_out)
        string = self.pmod_config.string and routed
        # a fresh tensor either way: safe to scatter into in place
        passed = hidden_states * weights.unsqueeze(-1) if string else hidden_states.clone()
        if subset.slot_valid is not None:  # padding slots write back what a skipped token holds
            skipped_value = kept_states * kept_weights if string else kept_states
            kept_out = torch.where(subset.slot_valid.unsqueeze(-1), kept_out, skipped_value)
        gather_hidden = subset.index.unsqueeze(-1).expand_as(kept_states)
        return passed.scatter_(1, gather_hidden, kept_out)

    # ---- a dense layer that ranks the vision tokens for the layers after it (FastV's K-1) ----

    def _dense_forward_ranking(
        self, hidden_states, position_embeddings, routing: RoutingInputs, **kwargs
    ):
        """Runs as usual, capturing its own q and k projections (not recomputed), then lets the
        method rank the vision tokens with them, so no attention backend has to return weights."""
        candidates = routing.vision_mask & routing.token_valid
        if not candidates.any():  # a decoding step: the kept set is already in the cache
            return super().forward(hidden_states, position_embeddings=position_embeddings, **kwargs)
        cache = kwargs.get(_cache_kwarg(type(self.self_attn)))
        if cache is not None and cache.get_seq_length(self.self_attn.layer_idx) > 0:
            raise NotImplementedError(
                f"{self.token_method.name} ranks the vision tokens at prefill; an image after a cached "
                "prefix is not supported"
            )
        projections: dict[str, torch.Tensor] = {}
        hooks = [
            self.self_attn.q_proj.register_forward_hook(partial(_keep_output, projections, "q")),
            self.self_attn.k_proj.register_forward_hook(partial(_keep_output, projections, "k")),
        ]
        try:
            output = super().forward(
                hidden_states, position_embeddings=position_embeddings, **kwargs
            )
        finally:
            for hook in hooks:
                hook.remove()
        self.token_method.rank(self, projections, position_embeddings, routing)
        return output


def _keep_output(store: dict, name: str, module, args, output) -> None:
    store[name] = output


@dataclass
class KeptTokens:
    """The tokens a MoD layer runs, gathered from the sequence (step 2)."""

    index: torch.Tensor  # (batch, kept) their places in the sequence, in order
    slot_valid: torch.Tensor | None  # (batch, kept) False: padding of a sample that keeps fewer
    states: torch.Tensor  # (batch, kept, hidden)
    positions: torch.Tensor  # (batch, kept) their positions (RoPE)
    rope: tuple[torch.Tensor, torch.Tensor]  # their cos, sin


def _gather_kept(keep, hidden_states, position_ids, position_embeddings) -> KeptTokens:
    """Kept tokens first, in order; a sample that keeps fewer is padded with (invalid) skipped
    tokens, which always sit after its valid slots. The rotary (cos, sin) of a kept token is its
    row of the full sequence's: the position it has there (1-D, or Qwen-VL's 3-D), never one
    recomputed from the shorter sequence."""
    batch, seq, hidden = hidden_states.shape
    device = hidden_states.device
    keep_per_sample = keep.sum(dim=1)  # (batch,)
    kept = int(keep_per_sample.max())
    if batch == 1:
        kept_index = keep[0].nonzero().view(1, kept)  # (1, kept)
        slot_valid = None
    else:
        kept_index = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[
            :, :kept
        ]
        slot_valid = torch.arange(kept, device=device)[None, :] < keep_per_sample[:, None]
    states = hidden_states.gather(1, kept_index.unsqueeze(-1).expand(batch, kept, hidden))
    positions = position_ids.expand(batch, seq).gather(1, kept_index)  # (batch, kept)
    cos, sin = position_embeddings
    gather_rope = kept_index.unsqueeze(-1).expand(batch, kept, cos.shape[-1])
    rope = (
        cos.expand(batch, -1, -1).gather(1, gather_rope),
        sin.expand(batch, -1, -1).gather(1, gather_rope),
    )
    return KeptTokens(kept_index, slot_valid, states, positions, rope)


def rank_within_groups(
    scores: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's place among the tokens of its group by score (0 = best; ties: the earlier
    token first), and the size of its group. ``groups`` (batch, seq) long, >= -1."""
    batch, seq = scores.shape
    groups = groups + 1  # -1 (no group) becomes group 0 of its own
    # sort by score, then stably by group: each group's tokens end up together, best first
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(groups.gather(1, order), dim=1, stable=True).indices)
    sizes = torch.zeros(batch, int(groups.max()) + 1, dtype=torch.long, device=scores.device)
    sizes.scatter_add_(1, groups, torch.ones_like(groups))  # (batch, groups)
    starts = sizes.cumsum(dim=1) - sizes  # each group's first place in the sorted order
    place = torch.arange(seq, device=scores.device).expand(batch, seq)
    rank_sorted = place - starts.gather(1, groups.gather(1, order))
    rank = torch.empty_like(order).scatter_(1, order, rank_sorted)
    return rank, sizes.gather(1, groups)


@functools.cache
def _cache_kwarg(attention_class: type) -> str:
    """The name HF attention modules take the KV cache under: ``cache`` from transformers 5.24
    on, ``past_key_values`` before."""
    parameters = inspect.signature(attention_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def subset_attention_mask(
    attn_implementation: str,
    query_positions: torch.Tensor,
    query_valid: torch.Tensor | None,
    past_valid: torch.Tensor | None,
    past_positions: torch.Tensor | None,
    sliding_window: int | None,
    dtype: torch.dtype,
):
    """The mask of a MoD layer: its cached slots, then causal over its new kept tokens.

    Slots are in position order and a sample's padding slots come after its real ones, so a
    plain causal mask over the new slots already hides padding from every real query; only
    padding slots left in the cache by earlier calls need masking. Returns None where the
    attention kernel's own causal mode is exact.
    """
    if attn_implementation not in ("eager", "sdpa") and not attn_implementation.startswith(
        "flash_attention"
    ):
        raise ValueError(
            f"p-MoD layers run with eager, sdpa or flash_attention_2 attention, not {attn_implementation!r}"
        )
    batch, kept = query_positions.shape
    past = 0 if past_valid is None else past_valid.shape[1]
    all_past_valid = past == 0 or bool(past_valid.all())
    if attn_implementation.startswith("flash_attention"):
        _check_flash_window(
            query_positions, query_valid, past_valid, past_positions, sliding_window
        )
        # 2-D key padding mask; the kernel aligns causality bottom-right per sample
        if all_past_valid and query_valid is None:
            return None
        parts = [past_valid] if past else []
        parts.append(
            query_valid
            if query_valid is not None
            else torch.ones_like(query_positions, dtype=torch.bool)
        )
        return torch.cat(parts, dim=1).long()
    if (
        sliding_window is None
        and all_past_valid
        and (past == 0 or kept == 1)
        and attn_implementation == "sdpa"
    ):
        return None
    device = query_positions.device
    causal = torch.ones(kept, kept, dtype=torch.bool, device=device).tril()
    allowed = causal.expand(batch, kept, kept)
    if sliding_window is not None:
        allowed = allowed & (
            query_positions[:, :, None] - query_positions[:, None, :] < sliding_window
        )
    if past:
        past_allowed = past_valid[:, None, :].expand(batch, kept, past)
        if sliding_window is not None:
            past_allowed = past_allowed & (
                query_positions[:, :, None] - past_positions[:, None, :] < sliding_window
            )
        allowed = torch.cat([past_allowed, allowed], dim=-1)
    allowed = allowed.unsqueeze(1)  # (batch, 1, kept, past + kept)
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


def _check_flash_window(query_positions, query_valid, past_valid, past_positions, sliding_window):
    """Refuse a sliding window that flash-attention would apply to other keys than eager / sdpa.

    The kernel counts a window in key slots; eager and sdpa (above) count it in the tokens'
    original positions. A MoD layer's slots skip the tokens it dropped (and unpadding drops its
    padding slots), so the two agree only while no key lies a window or more before a query."""
    if sliding_window is None:
        return
    positions, valid = query_positions, query_valid
    if valid is None:
        valid = torch.ones_like(query_positions, dtype=torch.bool)
    if past_positions is not None and past_positions.shape[1]:
        positions = torch.cat([past_positions, positions], dim=1)
        valid = torch.cat([past_valid, valid], dim=1)
    first = positions.masked_fill(~valid, torch.iinfo(positions.dtype).max).min(dim=1).values
    last = positions.masked_fill(~valid, -1).max(dim=1).values
    span = int((last - first).max())
    if span >= sliding_window:
        raise UserError(
            f"a p-MoD layer with a sliding window of {sliding_window} over {span + 1} positions: "
            "flash_attention_2 would count the window in kept tokens, not positions; "
            "use attn_implementation='sdpa' or 'eager'"
        )


# ---- conversion --------------------------------------------------------------------------

_PMOD_LAYER_CLASSES: dict[type, type] = {}


def pmod_layer_class(base: type) -> type:
    """``PMoD<Base>``: the HF decoder layer class with the p-MoD forward in front."""
    if base not in _PMOD_LAYER_CLASSES:
        cls = type(f"PMoD{base.__name__}", (PMoDLayerMixin, base), {"__module__": __name__})
        globals()[cls.__name__] = cls  # importable by name, so a converted model pickles
        _PMOD_LAYER_CLASSES[base] = cls
    return _PMOD_LAYER_CLASSES[base]


def convert_layer(
    layer: nn.Module, ratio: float, config: PMoDConfig, shared_router: Router | None = None
) -> nn.Module:
    """Turn one HF decoder layer into a p-MoD layer, in place (a router only if it is MoD)."""
    base = type(layer).__bases__[1] if isinstance(layer, PMoDLayerMixin) else type(layer)
    layer.__class__ = pmod_layer_class(base)
    layer.pmod_ratio = float(ratio)
    layer.pmod_config = config
    # p-MoD's own behaviour; methods.layer_modes may give the layer another (install_method)
    layer.token_mode = "route" if ratio < 1.0 else "dense"
    layer.token_method = method_from_dict(None)
    layer.ranks_tokens = False
    own_router = ratio < 1.0 and not config.shared_router
    if own_router and getattr(layer, "router", None) is None:
        # the width from the config: under ZeRO-3's zero.Init a parameter's shape is (0,)
        reference = layer.input_layernorm.weight
        layer.router = Router(
            layer.self_attn.config.hidden_size, device=reference.device, dtype=reference.dtype
        )
    elif not own_router and getattr(layer, "router", None) is not None:
        del layer.router
    # a plain attribute, not a submodule: the shared router's parameters live once, on the text model
    object.__setattr__(layer, "shared_router", shared_router)
    return layer


def _record(layer, keep, vision, weights, logits) -> None:
    recorder = active_recorder()
    if recorder is not None:
        ratio = layer.token_method.layer_ratio(layer)
        recorder.add(layer.self_attn.layer_idx, ratio, keep, vision, weights, logits)
