"""FLOPs and KV cache of one prefill: the single formula behind ``pmod flops``, the training
summary and the evaluation report.

It counts one forward pass (batch 1) over a prompt of T text tokens and V vision tokens, with
decoder layer l processing T + kept_count(V, R_l) tokens (R_l = 1 for a dense layer). V is the
shape's largest one-image layout, a given number, or (``video_frames``) a video's tokens by the
family's rule (LLaVA-OneVision: 196 pooled tokens per 384 px frame, and a newline).

Count modes (each result says which it used):

- ``paper``: the language model's linear layers (q, k, v, o; gate, up, down), the p-MoD routers
  and the lm_head over all T + V positions. This is what DeepSpeed's FLOPs profiler counted for
  the paper's tables: it sees linear layers but not fused attention, and the paper left the
  vision tower and projector out. For Vicuna it is
  sum_l (T + V*R_l) * 2*(4*d^2 + 3*d*m) + (T + V) * 2*d*vocab (+ 2*d*(T + V) per MoD-layer router).
  With grouped-query attention (Qwen2) q and o count d*d each and k, v count d*kv_dim each.
- ``full``: ``paper`` plus the attention score and value products of the language model (each
  query against the keys it can see: causal over the layer's kept tokens), the vision tower (every
  crop: patch embedding, every layer's linear and attention products, SigLIP's pooling head when
  the config has one) and the mlp2x_gelu projector.

A multiply-add is 2 FLOPs; bias adds, norms, activations, softmax and rotary embeddings are not
counted (neither DeepSpeed's profiler nor torch's FLOP counter counts them). Vision tokens kept
per layer are floor(V * R_l), as the model does, so the count matches an executed prefill exactly.

Which tokens compete (``routed_tokens``, as the model's ``PMoDConfig``):

- ``vision`` (p-MoD): the V vision tokens; MoD layer l processes T + floor(V * R_l) tokens.
- ``all`` (gamma-MoD): at inference the real tokens up to and including the last image token
  compete (P text tokens of the prompt before / around the image, and the V vision tokens); the
  question and generated tokens always pass. MoD layer l processes
  (T - P) + floor((V + P) * R_l) tokens. Without vision tokens nothing competes.

Every MoD layer pays for a router, Linear(d, 1), over all T + V tokens entering it; a shared
router (one Linear for all MoD layers) still runs once per MoD layer.

Training-free baselines (``method``, see ``model/methods/``) are counted by the same formula
with their own per-layer vision tokens (``kept_vision_tokens``) and no router: FastV's layers
0..K-1 process T + V tokens and the others T + round(V * (1 - R)) (its ranking reuses attention
weights the layer computes anyway, so it adds nothing to the paper count, as the profiler would
see it); random processes p-MoD's T + floor(V * R_l); pool processes T + N in every layer and
its lm_head runs over T + N positions. The dense reference is always the model on the image's
full V tokens. ``match_method`` finds the baseline setting whose count is closest to a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UserError
from ..model.families.shapes import attention_products
from ..model.methods import TokenMethod, method_from_dict
from ..model.presets import ModelShape, shape_from_hf_config
from ..model.schedules import kept_count

# routed_tokens="all": text tokens of the prompt that compete with the image when not given. The
# vicuna_v1 prompt before <image> is <s> + system prompt + " USER: ": 35 Llama/Vicuna tokens (the
# system-prompt length FastV uses for LLaVA-1.5); of the paper's T = 58, the other 23 are the question
DEFAULT_PREFIX_TEXT_TOKENS = 35
ROUTED_TOKENS = ("vision", "all")
COUNT_MODES = {
    "paper": "paper count: language-model linear layers + routers + lm_head (DeepSpeed profiler convention)",
    "full": "full count: paper count + attention score/value products (causal) + vision tower + projector",
}
# "causal": the query-key pairs a causal mask allows (what the math needs, and what FlashAttention's
# causal kernels compute); "all": every pair, which eager and SDPA's math kernels multiply and
# torch's FLOP counter reports
ATTENTION_PAIRS = ("causal", "all")
DTYPE_BYTES = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "int8": 1,
    "float64": 8,
}


@dataclass(frozen=True)
class LayerCount:
    """One decoder layer in the counted prefill."""

    layer: int
    ratio: float  # retention ratio R_l; 1.0 for a dense layer (a MoD layer may measure 1.0 too)
    # vision tokens it processes and caches, floor(V * R_l); None when text competes too
    # (routed_tokens="all"), as the router then decides how the kept tokens split
    kept_vision: int | None
    tokens: int  # tokens it processes and caches: the passing ones + kept_competing
    flops: int  # this layer's FLOPs in the count mode (router included)
    kv_cache_bytes: int  # K and V of its cached tokens
    kept_competing: int  # competing tokens it keeps: floor(competing * R_l)
    is_mod: bool  # processes a subset of the competing tokens
    has_router: bool = (
        True  # a MoD layer of p-MoD pays for a router; a baseline's subset layer does not
    )

    @property
    def kind(self) -> str:
        if not self.is_mod:
            return "dense"
        return "MoD" if self.has_router else "pruned"


@dataclass(frozen=True)
class FlopsCount:
    """FLOPs and KV cache of a p-MoD prefill next to the dense model's."""

    model: str
    count: str  # "paper" | "full"
    vision_tokens: int
    text_tokens: int
    vision_crops: int
    dtype: str
    retention_ratios: tuple[float, ...]
    flops: int
    baseline_flops: int
    components: dict[str, int]  # where the p-MoD FLOPs go
    baseline_components: dict[str, int]
    kv_cache_ratio: float  # paper convention: mean over layers of R_l (vision part only)
    kv_cache_bytes: int  # real cache: every layer's T + kept tokens, K and V
    baseline_kv_cache_bytes: int
    layers: tuple[LayerCount, ...]
    routed_tokens: str = "vision"  # "vision" | "all": which tokens compete
    prefix_text_tokens: int = 0  # text tokens that compete (routed_tokens="all")
    competing_tokens: int = 0  # tokens that compete in a MoD layer: V, or V + prefix_text_tokens
    method: TokenMethod = method_from_dict(None)  # pmod, or the method counted

    @property
    def tflops(self) -> float:
        return self.flops / 1e12

    @property
    def baseline_tflops(self) -> float:
        return self.baseline_flops / 1e12

    @property
    def ratio(self) -> float:
        """p-MoD FLOPs / dense FLOPs."""
        return self.flops / self.baseline_flops

    @property
    def kv_cache_bytes_ratio(self) -> float:
        """Real cache bytes / dense cache bytes (text tokens included, unlike ``kv_cache_ratio``)."""
        return self.kv_cache_bytes / self.baseline_kv_cache_bytes

    @property
    def mod_layers(self) -> list[int]:
        return [row.layer for row in self.layers if row.kind == "MoD"]

    @property
    def subset_layers(self) -> list[int]:
        """Layers that process a subset of the vision tokens (p-MoD's MoD layers, FastV's, random's)."""
        return [row.layer for row in self.layers if row.is_mod]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "count": self.count,
            "count_description": COUNT_MODES[self.count],
            "vision_tokens": self.vision_tokens,
            "text_tokens": self.text_tokens,
            "vision_crops": self.vision_crops,
            "dtype": self.dtype,
            "routed_tokens": self.routed_tokens,
            "prefix_text_tokens": self.prefix_text_tokens,
            "competing_tokens": self.competing_tokens,
            "baseline_tflops": self.baseline_tflops,
            "tflops": self.tflops,
            "ratio": self.ratio,
            "baseline_flops": self.baseline_flops,
            "flops": self.flops,
            "components_flops": dict(self.components),
            "baseline_components_flops": dict(self.baseline_components),
            "kv_cache_ratio": self.kv_cache_ratio,
            "kv_cache_bytes": self.kv_cache_bytes,
            "baseline_kv_cache_bytes": self.baseline_kv_cache_bytes,
            "kv_cache_bytes_ratio": self.kv_cache_bytes_ratio,
            "retention_ratios": list(self.retention_ratios),
            "mod_layers": self.mod_layers,
            "method": self.method.name,
            "method_label": self.method.label,
            "method_settings": self.method.to_dict(),
            "layers": [
                {
                    "layer": row.layer,
                    "kind": row.kind,
                    "ratio": row.ratio,
                    "kept_vision_tokens": row.kept_vision,
                    "kept_competing_tokens": row.kept_competing,
                    "tokens": row.tokens,
                    "flops": row.flops,
                    "kv_cache_bytes": row.kv_cache_bytes,
                }
                for row in self.layers
            ],
        }


def count_flops(
    shape: ModelShape,
    retention_ratios: Sequence[float] | None = None,
    *,
    vision_tokens: int | None = None,
    text_tokens: int | None = None,
    count: str = "paper",
    dtype: str = "bf16",
    attention_pairs: str = "causal",
    routed_tokens: str = "vision",
    prefix_text_tokens: int | None = None,
    mod_layers: Sequence[int] | None = None,
    video_frames: int | None = None,
    method: TokenMethod | None = None,
    vision_crops: int | None = None,
) -> FlopsCount:
    """Count a prefill of ``shape`` with per-layer ``retention_ratios`` (None: the dense model).

    ``vision_tokens`` / ``text_tokens`` default to the shape's V (largest image layout) and T (58);
    ``video_frames`` counts a video of that many frames instead (V and the tower's crops);
    ``vision_crops``: the crops the tower sees for a given V (default: the largest layout's).
    ``attention_pairs`` only matters for ``count="full"``; see ``ATTENTION_PAIRS``.
    ``routed_tokens="all"``: ``prefix_text_tokens`` of the T text tokens compete with the image
    (default ``DEFAULT_PREFIX_TEXT_TOKENS``, or T if smaller).
    ``mod_layers``: the layers that route (measured ratios may be 1.0 in a MoD layer); default:
    the layers with a ratio below 1.
    ``method``: a training-free baseline counted instead of p-MoD (``retention_ratios`` are then
    p-MoD's plan, whose budget the random method uses); the baselines select among vision tokens.
    """
    _check_count_options(count, dtype, routed_tokens, attention_pairs)
    method = method or method_from_dict(None)
    method.check_family(shape.family)  # a method the family cannot run is refused, not counted
    method = method.for_family(shape.family.name)
    if not method.needs_router:
        routed_tokens, prefix_text_tokens = "vision", None
    num_vision, crops = _vision_layout(shape, vision_tokens, video_frames, vision_crops, method)
    tokens, num_prefix = _prompt_tokens(
        shape, num_vision, crops, text_tokens, routed_tokens, prefix_text_tokens
    )
    ratios = _layer_ratios(retention_ratios, shape.text.num_layers)
    is_mod = _mod_flags(ratios, mod_layers)
    prefill = _Prefill(
        tokens, routed_tokens, num_prefix, *_method_plan(method, ratios, is_mod, tokens)
    )
    return _count_prefill(shape, method, prefill, count, dtype, attention_pairs)


@dataclass(frozen=True)
class _Prefill:
    """What a counted prefill runs: the prompt, and what the language model does with it."""

    tokens: _TokenCounts  # the prompt, as the dense model takes it
    routed_tokens: str
    prefix_text_tokens: int  # text tokens that compete with the image
    llm_tokens: _TokenCounts  # entering the language model (a method may drop vision tokens)
    plan: _LayerPlan
    ratios: list[float]  # per layer: the share of the competing tokens it keeps


def _prompt_tokens(
    shape: ModelShape,
    num_vision: int,
    crops: int,
    text_tokens: int | None,
    routed_tokens: str,
    prefix_text_tokens: int | None,
) -> tuple[_TokenCounts, int]:
    """(the prompt's V, T, competing tokens and crops; the text tokens that compete)."""
    num_text = shape.text_tokens if text_tokens is None else text_tokens
    if num_vision < 0 or num_text < 0 or num_vision + num_text == 0:
        raise UserError(
            f"need vision tokens >= 0, text tokens >= 0 and some tokens, got V={num_vision}, T={num_text}"
        )
    num_prefix = _competing_text_tokens(routed_tokens, prefix_text_tokens, num_text)
    # with no image there is no last image token, so nothing competes (layer.py's rule)
    num_competing = num_vision + num_prefix if num_vision > 0 else 0
    tokens = _TokenCounts(num_vision, num_text, num_competing, routed_tokens == "vision", crops)
    return tokens, num_prefix


def _method_plan(
    method: TokenMethod, ratios: list[float], is_mod: list[bool], tokens: _TokenCounts
) -> tuple[_TokenCounts, _LayerPlan, list[float]]:
    """(tokens entering the language model, per-layer plan, per-layer share kept)."""
    if not method.needs_router:
        return _baseline_plan(method, ratios, tokens, len(ratios))
    # p-MoD's routers: the MoD layers keep their share of the competing tokens
    kept = [
        kept_count(tokens.competing, r) if mod else tokens.competing
        for r, mod in zip(ratios, is_mod, strict=True)
    ]
    return tokens, _LayerPlan(kept, is_mod, is_mod), ratios


def _count_prefill(
    shape: ModelShape,
    method: TokenMethod,
    prefill: _Prefill,
    count: str,
    dtype: str,
    attention_pairs: str,
) -> FlopsCount:
    """The prefill's FLOPs and KV cache next to the dense model's on the same prompt."""
    include_full = count == "full"
    num_layers = shape.text.num_layers
    tokens, layer_ratios = prefill.tokens, prefill.ratios
    components, layers = _prefill_flops(
        shape, layer_ratios, prefill.plan, prefill.llm_tokens, include_full, attention_pairs, dtype
    )
    dense_plan = _LayerPlan(
        [tokens.competing] * num_layers, [False] * num_layers, [False] * num_layers
    )
    baseline_components, baseline_layers = _prefill_flops(
        shape, [1.0] * num_layers, dense_plan, tokens, include_full, attention_pairs, dtype
    )
    ranking = method.ranking_flops(shape, prefill.llm_tokens.vision, tokens.text)
    if include_full and ranking:  # the method's own choosing: its scores, its similarities
        components["method_ranking"] = ranking
    return FlopsCount(
        model=shape.name,
        count=count,
        vision_tokens=tokens.vision,
        text_tokens=tokens.text,
        vision_crops=tokens.crops,
        dtype=dtype,
        retention_ratios=tuple(layer_ratios),
        flops=sum(components.values()),
        baseline_flops=sum(baseline_components.values()),
        components=components,
        baseline_components=baseline_components,
        kv_cache_ratio=sum(layer_ratios) / num_layers,
        kv_cache_bytes=sum(row.kv_cache_bytes for row in layers),
        baseline_kv_cache_bytes=sum(row.kv_cache_bytes for row in baseline_layers),
        layers=tuple(layers),
        routed_tokens=prefill.routed_tokens,
        prefix_text_tokens=prefill.prefix_text_tokens,
        competing_tokens=tokens.competing,
        method=method,
    )


def _check_count_options(count, dtype, routed_tokens, attention_pairs) -> None:
    if count not in COUNT_MODES:
        raise UserError(f"unknown count mode {count!r}; choose one of {', '.join(COUNT_MODES)}")
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown KV cache dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    if routed_tokens not in ROUTED_TOKENS:
        raise UserError(
            f"unknown routed_tokens {routed_tokens!r}; choose one of {', '.join(ROUTED_TOKENS)}"
        )
    if attention_pairs not in ATTENTION_PAIRS:
        raise ValueError(
            f"attention_pairs must be one of {ATTENTION_PAIRS}, got {attention_pairs!r}"
        )


def _layer_ratios(retention_ratios, num_layers: int) -> list[float]:
    """One ratio per layer (None: the dense model)."""
    if retention_ratios is None:
        return [1.0] * num_layers
    ratios = [float(r) for r in retention_ratios]
    if len(ratios) != num_layers:
        raise ValueError(f"{len(ratios)} retention ratios for a {num_layers}-layer model")
    return ratios


def _vision_layout(
    shape: ModelShape,
    vision_tokens: int | None,
    video_frames: int | None,
    vision_crops: int | None,
    method: TokenMethod,
) -> tuple[int, int]:
    """(V, crops through the vision tower): the largest image layout as the method hands it to
    the processor, a given V (and its crops), or a video."""
    if video_frames is None:
        if vision_tokens is None:
            return method.vision_layout(shape)
        return vision_tokens, shape.vision_crops if vision_crops is None else vision_crops
    if vision_tokens is not None:
        raise UserError("give the vision tokens or the video frames, not both")
    if video_frames < 1:
        raise UserError(f"video frames must be at least 1, got {video_frames}")
    return shape.video_tokens(video_frames)


def _baseline_plan(
    method: TokenMethod, pmod_ratios: list[float], tokens: _TokenCounts, num_layers: int
) -> tuple[_TokenCounts, _LayerPlan, list[float]]:
    """A method's (tokens entering the language model, per-layer plan, per-layer share of V)."""
    method.check(num_layers, tokens.vision if method.needs_vision_tokens else None)
    entering = method.entering_tokens(tokens.vision, tokens.crops)
    kept = method.kept_vision_tokens(pmod_ratios, entering)
    # a subset layer that still holds every vision token (SparseVLM's sparse layer) prunes nothing
    subset = [
        mode != "dense" and count < entering
        for mode, count in zip(method.layer_modes(pmod_ratios), kept, strict=True)
    ]
    share = [count / tokens.vision if tokens.vision else 1.0 for count in kept]
    plan = _LayerPlan(kept, subset, [False] * num_layers)
    return _TokenCounts(entering, tokens.text, entering, True, tokens.crops), plan, share


def _competing_text_tokens(
    routed_tokens: str, prefix_text_tokens: int | None, num_text: int
) -> int:
    """How many of the T text tokens compete with the image."""
    if routed_tokens == "vision":
        if prefix_text_tokens:
            raise UserError(
                "prefix text tokens only compete when routed_tokens is 'all'; this setting routes vision tokens only"
            )
        return 0
    if prefix_text_tokens is None:
        return min(DEFAULT_PREFIX_TEXT_TOKENS, num_text)
    if not 0 <= prefix_text_tokens <= num_text:
        raise UserError(
            f"prefix text tokens must be between 0 and the {num_text} text tokens, got {prefix_text_tokens}"
        )
    return prefix_text_tokens


def _mod_flags(ratios: list[float], mod_layers: Sequence[int] | None) -> list[bool]:
    if mod_layers is None:
        return [ratio < 1.0 for ratio in ratios]
    chosen = set(mod_layers)
    if not chosen <= set(range(len(ratios))):
        raise ValueError(f"mod_layers {sorted(chosen)} out of range for {len(ratios)} layers")
    dense_below_one = [i for i, ratio in enumerate(ratios) if i not in chosen and ratio < 1.0]
    if dense_below_one:
        raise ValueError(f"layers {dense_below_one} have ratios below 1 but are not in mod_layers")
    return [i in chosen for i in range(len(ratios))]


def count_flops_for_model(
    model,
    *,
    vision_tokens: int | None = None,
    text_tokens: int | None = None,
    count: str = "paper",
    dtype: str | None = None,
    prefix_text_tokens: int | None = None,
    video_frames: int | None = None,
    vision_crops: int | None = None,
) -> FlopsCount:
    """``count_flops`` for a loaded HF model of a registered family, dense or p-MoD.

    The ratios and routed tokens are the model's own (``model.retention_ratios`` and
    ``config.pmod`` of a p-MoD model; a threshold-routing model is counted at its top-k ratios),
    and so is the method it runs (``model.token_method``; ``vision_tokens`` is then the images'
    V before any pooling); ``dtype`` defaults to the model's parameter dtype.
    """
    shape = shape_from_hf_config(
        model.config, name=getattr(model.config, "_name_or_path", "") or type(model).__name__
    )
    ratios = getattr(model, "retention_ratios", None)
    routed_tokens = shape.pmod.routed_tokens if shape.pmod is not None else "vision"
    if dtype is None:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return count_flops(
        shape,
        ratios,
        vision_tokens=vision_tokens,
        text_tokens=text_tokens,
        count=count,
        dtype=dtype,
        routed_tokens=routed_tokens,
        prefix_text_tokens=prefix_text_tokens if routed_tokens == "all" else None,
        video_frames=video_frames,
        vision_crops=vision_crops,
        method=getattr(model, "token_method", None),
    )


def match_method(
    shape: ModelShape,
    retention_ratios: Sequence[float] | None,
    method: TokenMethod,
    target_flops: int,
    **count_options,
) -> TokenMethod:
    """The setting of ``method``'s knob whose count comes closest to ``target_flops`` (FastV's R at
    its K, R = 1 - kept / V; pool's N among the counts that tile the patch grid; see each
    method's ``settings``). A method with no knob comes back as given.
    ``count_options`` are ``count_flops``'s (vision_tokens, text_tokens, count, dtype, ...)."""
    if method.knob is None:
        return method
    num_vision = count_options.get("vision_tokens")
    num_vision = shape.vision_tokens if num_vision is None else num_vision
    settings = method.settings(num_vision)
    if not settings:
        raise UserError(
            "there are no vision tokens to match a setting on; give --vision-tokens above 0"
        )

    def distance(setting: TokenMethod) -> int:
        return abs(
            count_flops(shape, retention_ratios, method=setting, **count_options).flops
            - target_flops
        )

    return min(settings, key=distance)


# ---- the formula --------------------------------------------------------------------------


@dataclass(frozen=True)
class _TokenCounts:
    vision: int  # V entering the language model
    text: int  # T
    competing: int  # tokens that compete in a MoD layer (V, or V + prefix text)
    only_vision_competes: bool
    crops: int  # crops (images' tiles, video frames) through the vision tower


@dataclass(frozen=True)
class _LayerPlan:
    kept_competing: list[int]  # per layer: competing tokens it processes
    subset: list[bool]  # per layer: processes a subset (MoD or a baseline's pruned layer)
    routers: list[bool]  # per layer: pays for a router


def _prefill_flops(
    shape: ModelShape,
    ratios: list[float],
    plan: _LayerPlan,
    tokens: _TokenCounts,
    include_full: bool,
    attention_pairs: str,
    dtype: str,
) -> tuple[dict[str, int], list[LayerCount]]:
    text = shape.text
    d, m = text.hidden_size, text.intermediate_size
    # per token and layer: q and o are (d x q_dim), k and v (d x kv_dim), the gated MLP 3 x (d x m)
    linear_per_token = 2 * (2 * d * text.q_dim + 2 * d * text.kv_dim + 3 * d * m)
    all_tokens = tokens.text + tokens.vision
    passing = all_tokens - tokens.competing  # tokens every layer processes
    bytes_per_entry = 2 * text.kv_dim * DTYPE_BYTES[dtype]  # K and V of one token

    components = {
        "language_model_linear": 0,
        "routers": 0,
        "lm_head": 2 * all_tokens * d * text.vocab_size,
    }
    if include_full:
        components["attention_products"] = 0
    layers = []
    for index, ratio in enumerate(ratios):
        kept_competing, mod = plan.kept_competing[index], plan.subset[index]
        layer_tokens = passing + kept_competing
        linear = layer_tokens * linear_per_token
        # a MoD layer's router scores every token entering it: Linear(d, 1)
        router = 2 * all_tokens * d if plan.routers[index] else 0
        attention = (
            attention_products(_text_pairs(layer_tokens, attention_pairs), text.q_dim)
            if include_full
            else 0
        )
        components["language_model_linear"] += linear
        components["routers"] += router
        if include_full:
            components["attention_products"] += attention
        layers.append(
            LayerCount(
                layer=index,
                ratio=ratio,
                kept_vision=_kept_vision(tokens, mod, kept_competing),
                tokens=layer_tokens,
                flops=linear + router + attention,
                kv_cache_bytes=layer_tokens * bytes_per_entry,
                kept_competing=kept_competing,
                is_mod=mod,
                has_router=plan.routers[index],
            )
        )
    if include_full:  # the family knows its tower and connector
        components.update(shape.family.vision_encoder_flops(shape, tokens.vision, tokens.crops))
    return components, layers


def _kept_vision(tokens: _TokenCounts, mod: bool, kept_competing: int) -> int | None:
    if not mod:
        return tokens.vision
    # with text competing too, the router decides how many of the kept tokens are vision
    return kept_competing if tokens.only_vision_competes else None


def _text_pairs(tokens: int, attention_pairs: str) -> int:
    """Query-key pairs of a decoder layer's causal attention over its ``tokens``."""
    return tokens * (tokens + 1) // 2 if attention_pairs == "causal" else tokens * tokens
