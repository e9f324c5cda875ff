"""``visionzip``: VisionZip (Yang et al., CVPR 2025). Before the language model, each crop the
CLIP tower encodes keeps D dominant tokens (the CLS token and the D - 1 patches its attention at
the feature layer favours, summed over heads) and C contextual tokens (the other tokens merged
into C targets by the cosine similarity of their head-mean keys: target + the mean of the tokens
assigned to it). The language model then sees D + C tokens per crop; every layer is dense.

As the official code (``dvlab-research/VisionZip`` @3151f6d, ``visionzip/clip_encoder.py``):
- the CLS token is always the first dominant token and goes to the projector, although HF's
  ``vision_feature_select_strategy="default"`` drops it otherwise;
- the tower runs in full (its FLOPs are unchanged); the CLS row's attention probabilities are
  recomputed here from that layer's own q/k projections, since sdpa / FA2 return none;
- LLaVA-NeXT: each crop is compressed on its own; the base crop's D + C tokens come first, then
  the grid crops' kept patches in reading order of the whole grid, their CLS tokens, their
  contextual tokens (``llava_arch.py``): no unpadding and no newline tokens.

Qwen2.5-VL (``MergedVisionZip``, as the official port ``Qwen2_5_VL/qwen2_5vl_visionzip.py``): the
choice is made after the merger, on the language model's input embeddings. A token's score is the
attention its 2 x 2 patches receive in the tower's last block (mean over heads, summed over the
queries of its attention segment, mean over the 4 patches), its metric their post-RoPE keys
(mean over the 4 patches and the heads). Each image of N tokens keeps its D dominant tokens and C
contextual ones (target + the mean of the tokens assigned to it, in the target's place); the
kept tokens keep their 3-D positions, and the dropped ones are in no layer and no KV cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    apply_rotary_pos_emb_vision,
    get_vision_window_index,
)

from .base import MethodError, TokenMethod, register_method
from .single_image import check_one_image, refuse_video_hook

FAMILIES = ("llava", "llava_next")
MERGED_FAMILIES = ("qwen2_5_vl",)  # chosen after the merger, inside the model
REFERENCE_CROP = 576  # LLaVA-1.5's crop, which D and C count tokens of


@register_method
@dataclass(frozen=True)
class VisionZip(TokenMethod):
    """Options: ``dominant`` (D, the CLS token included) and ``contextual`` (C), per crop, the
    official code's defaults 191 + 30; ``tokens`` (D + C, split in the proportion of
    ``dominant:contextual``; ``--match-tflops`` chooses it)."""

    name = "visionzip"
    title = (
        "VisionZip (Yang et al., 2025) keeps D dominant tokens per crop by the CLS token's "
        "attention and merges the rest into C contextual tokens, before the language model"
    )
    knob = "tokens"
    needs_vision_tokens = True
    example = "visionzip:dominant=6,contextual=2"  # runs on the tests' 4 x 4 patch crops
    dominant: int = 191
    contextual: int = 30
    tokens: int | None = None

    def __post_init__(self) -> None:
        if self.dominant < 1:
            raise MethodError(
                f"visionzip's dominant tokens include the CLS token: at least 1, got {self.dominant}"
            )
        if self.contextual < 0:
            raise MethodError(
                f"visionzip's contextual tokens must be 0 or more, got {self.contextual}"
            )
        if self.tokens is not None and self.tokens < 1:
            raise MethodError(f"visionzip's tokens must be at least 1, got {self.tokens}")

    @property
    def counts(self) -> tuple[int, int]:
        """(D, C) per crop: as given, or ``tokens`` split in the proportion D:C (D >= 1)."""
        if self.tokens is None:
            return self.dominant, self.contextual
        share = self.contextual / (self.dominant + self.contextual)
        contextual = min(round(self.tokens * share), self.tokens - 1)
        return self.tokens - contextual, contextual

    @property
    def per_crop(self) -> int:
        return sum(self.counts)

    @property
    def label(self) -> str:
        return "VisionZip {}+{}".format(*self.counts)

    def check(self, num_layers: int, vision_tokens: int | None = None) -> None:
        if vision_tokens is not None and self.per_crop > vision_tokens:
            raise MethodError(
                f"visionzip keeps {self.per_crop} tokens per crop (dominant + contextual), more than the "
                f"{vision_tokens} vision tokens of a crop here; lower dominant / contextual "
                f"(e.g. visionzip:dominant={max(1, vision_tokens * 7 // 8)},contextual={vision_tokens // 8})"
            )

    def check_family(self, family) -> None:
        super().check_family(family)
        if family.name not in FAMILIES + MERGED_FAMILIES:
            raise MethodError(
                f"visionzip compresses a CLIP tower's crops (LLaVA-1.5, LLaVA-NeXT) or Qwen2.5-VL's "
                f"merged tokens; it does not run on {family.title}"
            )

    def for_family(self, family_name: str) -> TokenMethod:
        if family_name in MERGED_FAMILIES and type(self) is VisionZip:
            return MergedVisionZip(**dataclasses.asdict(self))
        return self

    def check_config(self, config) -> None:
        _feature_index(config)

    def entering_tokens(self, num_vision: int, crops: int = 1) -> int:
        return self.per_crop * crops

    def prompt_tokens_per_image(self) -> int | None:
        return self.per_crop

    def image_placeholders(self, model, inputs: dict) -> list[int] | None:
        if model.pmod_family.name != "llava_next":
            return None  # LLaVA-1.5: one crop, prompt_tokens_per_image
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:  # generate encodes the images ahead: their zipped features
            return [len(features) for features in encoded.pooler_output]
        if inputs.get("image_sizes") is None:
            return None
        config = model.config
        return [
            self.per_crop
            * image_size_to_num_patches(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            for size in inputs["image_sizes"].tolist()
        ]

    def settings(self, num_vision: int) -> list[TokenMethod]:
        return [self.replace(tokens=tokens) for tokens in range(1, num_vision + 1)]

    def install(self, model, vision_tokens: int | None) -> None:
        layer = _feature_layer(model)
        capture = _TowerCapture(layer.self_attn.num_heads, layer.self_attn.scale)
        hooks = [
            layer.register_forward_hook(capture.keep_hidden),
            layer.self_attn.q_proj.register_forward_hook(capture.keep_queries),
            layer.self_attn.k_proj.register_forward_hook(capture.keep_keys),
            model.model.multi_modal_projector.register_forward_pre_hook(
                partial(_zip_projector_input, capture, *self.counts)
            ),
        ]
        if model.pmod_family.name == "llava_next":
            hooks.append(_PackOverride(model.model, capture, self.counts[0]))
        model._pmod_method_hooks.extend(hooks)

    def ranking_flops(self, shape, num_vision: int, num_text: int) -> int:
        """Per crop (``num_vision``: the D + C tokens per crop that enter): the CLS row's
        attention logits (N keys), the similarities of the tokens to merge to the C targets
        (head-mean keys) and the merge (assignment matrix times their hidden states); the
        q / k projections are the tower's own."""
        vision = shape.vision
        n, width = vision.tokens_per_crop, vision.hidden_size
        dominant, contextual = self.counts
        others = max(n - dominant - contextual, 0)
        head_dim = width // vision.num_heads
        per_crop = 2 * n * width + 2 * others * contextual * (head_dim + width)
        return per_crop * max(1, num_vision // self.per_crop)


# ---- on a model ---------------------------------------------------------------------------


def _feature_layer(model):
    """The CLIP encoder layer whose output LLaVA reads (``vision_feature_layer``)."""
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    return layers[_feature_index(model.config) - 1]


def _feature_index(config) -> int:
    """i of ``hidden_states[i]`` (layer i - 1's output) that LLaVA reads; a MethodError for a tower
    VisionZip cannot rank (no CLS token, several feature layers, the embeddings)."""
    if not config.vision_config.model_type.startswith("clip"):
        raise MethodError(
            f"visionzip ranks by the CLS token's attention; a {config.vision_config.model_type} tower has none"
        )
    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise MethodError(
            f"visionzip reads one feature layer of the tower, not {list(feature_layer)}"
        )
    index = feature_layer % (config.vision_config.num_hidden_layers + 1)
    if index == 0:
        raise MethodError("visionzip needs a feature layer after the tower's embeddings")
    return index


@dataclass
class _TowerCapture:
    """What the feature layer computed in the current call: its output and its q / k."""

    num_heads: int
    scale: float
    hidden: torch.Tensor | None = None  # (crops, N, width)
    queries: torch.Tensor | None = None  # (crops, N, width)
    keys: torch.Tensor | None = None
    chosen: torch.Tensor | None = None  # (crops, N) bool: each crop's dominant tokens

    def keep_hidden(self, module, args, output) -> None:
        self.hidden = output

    def keep_queries(self, module, args, output) -> None:
        self.queries = output

    def keep_keys(self, module, args, output) -> None:
        self.keys = output


def _zip_projector_input(capture: _TowerCapture, dominant: int, contextual: int, module, args):
    """Forward pre-hook on the projector: (crops, V, width) -> (crops, D + C, width)."""
    features = args[0]
    if capture.hidden is None or capture.hidden.shape[0] != features.shape[0]:
        raise RuntimeError("visionzip found no tower output of this call's crops")
    zipped, capture.chosen = zip_crops(
        capture.hidden,
        capture.queries,
        capture.keys,
        capture.num_heads,
        capture.scale,
        dominant,
        contextual,
    )
    capture.hidden = capture.queries = capture.keys = None
    return (zipped.to(features.dtype), *args[1:])


def zip_crops(
    hidden: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    scale: float,
    dominant: int,
    contextual: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on each crop: (crops, N, width) tower tokens (CLS first) and their q / k at the
    feature layer -> ((crops, D + C, width) tokens, (crops, N) bool dominant tokens)."""
    crops, n, width = hidden.shape
    head_dim = width // num_heads
    q = queries[:, :1].float().view(crops, 1, num_heads, head_dim).transpose(1, 2)
    k = keys.float().view(crops, n, num_heads, head_dim).transpose(1, 2)  # (crops, heads, N, d)
    cls_row = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)  # (crops, heads, 1, N)
    scores = cls_row.sum(dim=1)[:, 0, 1:]  # (crops, N - 1): the patches, summed over heads
    top = scores.topk(dominant - 1, dim=1).indices + 1
    chosen = torch.zeros(crops, n, dtype=torch.bool, device=hidden.device)
    chosen[:, 0] = True  # the CLS token is always dominant
    chosen.scatter_(1, top, True)
    dominant_tokens = hidden[chosen].view(crops, dominant, width)  # in token order
    if contextual == 0:
        return dominant_tokens, chosen
    remaining = n - dominant
    metric = k.mean(dim=1)[~chosen].view(crops, remaining, head_dim)  # head-mean keys
    rest = hidden[~chosen].view(crops, remaining, width)
    contextual_tokens, _ = merge_contextual(rest, metric, contextual)
    return torch.cat([dominant_tokens, contextual_tokens.to(hidden.dtype)], dim=1), chosen


def merge_contextual(rest: torch.Tensor, metric: torch.Tensor, contextual: int):
    """VisionZip's contextual tokens: of ``rest`` (groups, R, width) with their ``metric``
    (groups, R, d), C targets by uniform stride, every other token assigned to the target of the
    most cosine-similar metric; ((groups, C, width) fp32 target + mean of its assigned tokens,
    (C,) the targets' indices in ``rest``)."""
    remaining = rest.shape[1]
    metric = metric.float() / metric.float().norm(dim=-1, keepdim=True)
    rest = rest.float()
    step = max(1, remaining // contextual)
    targets = torch.arange(0, remaining, step, device=rest.device)[:contextual]
    is_target = torch.zeros(remaining, dtype=torch.bool, device=rest.device)
    is_target[targets] = True
    similarity = metric[:, ~is_target] @ metric[:, targets].transpose(1, 2)  # (groups, others, C)
    assign = F.one_hot(similarity.argmax(dim=2), contextual).float()  # (groups, others, C)
    counts = assign.sum(dim=1).clamp(min=1)[..., None]  # (groups, C, 1)
    merged = assign.transpose(1, 2) @ rest[:, ~is_target] / counts  # mean of the assigned
    return rest[:, targets] + merged, targets


class _PackOverride:
    """LLaVA-NeXT: ``pack_image_features`` in the official order (a removable hook)."""

    def __init__(self, model, capture: _TowerCapture, dominant: int):
        self.model = model
        model.pack_image_features = partial(_pack_zipped, model, capture, dominant)

    def remove(self) -> None:
        if "pack_image_features" in vars(self.model):
            del self.model.pack_image_features


def _pack_zipped(
    model,
    capture,
    dominant,
    image_features,
    image_sizes,
    vision_feature_select_strategy,
    image_newline=None,
):
    """Each image's zipped crops (crops, D + C, hidden) -> its tokens: the base crop's D + C,
    then the grid crops' kept patches in reading order of the whole grid, their CLS tokens and
    their contextual tokens (``restore_image_features_sorted``); no newline tokens."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    chosen = torch.split(capture.chosen, [len(feature) for feature in image_features])
    packed = []
    for feature, kept, size in zip(image_features, chosen, image_sizes, strict=True):
        rows, cols = get_anyres_image_grid_shape(
            size, config.image_grid_pinpoints, config.vision_config.image_size
        )
        grid = feature[1:]  # (rows * cols, D + C, hidden)
        patches = kept[1:, 1:]  # (rows * cols, side * side): kept patches, CLS left out
        crop = torch.arange(rows * cols, device=grid.device)[:, None]
        place = torch.arange(side * side, device=grid.device)[None, :]
        # each patch's index in the reading order of the (rows * side, cols * side) map
        reading = ((crop // cols) * side + place // side) * (cols * side) + (crop % cols) * side
        reading = reading + place % side
        order = reading[patches].argsort()
        patch_tokens = grid[:, 1:dominant].reshape(-1, grid.shape[-1])[order]
        contextual = grid[:, dominant:].reshape(-1, grid.shape[-1])
        packed.append(torch.cat([feature[0], patch_tokens, grid[:, 0], contextual]))
    capture.chosen = None
    lengths = torch.tensor([len(p) for p in packed], dtype=torch.long, device=packed[0].device)
    return packed, lengths


# ---- Qwen2.5-VL: after the merger, inside the model -------------------------------------------


@dataclass(frozen=True)
class MergedVisionZip(VisionZip):
    """VisionZip on Qwen2.5-VL, as its official port: the same options, D and C counting tokens
    of a 576-token image (LLaVA-1.5's crop) and scaled to each image's N merged tokens (the
    official port's 0.65 N + 0.05 N is ``dominant=374,contextual=29``). Every layer runs the kept
    tokens; one image per sample, no video (the official port's limits)."""

    images_per_sample = 1
    top_scored = False  # the contextual tokens sit in their targets' places

    @property
    def label(self) -> str:
        dominant, contextual = self.counts
        share = REFERENCE_CROP / 100
        return f"VisionZip {dominant / share:.3g}%+{contextual / share:.3g}% of each image"

    def image_counts(self, num_vision: int) -> tuple[int, int]:
        """(D, C) of an image of ``num_vision`` merged tokens: the counts scaled by N / 576
        (rounded down; at least one of each, and no more than N together)."""
        dominant, contextual = self.counts
        scale = num_vision / REFERENCE_CROP
        kept_dominant = min(max(int(dominant * scale), 1), num_vision)
        kept_contextual = min(max(int(contextual * scale), 1), num_vision - kept_dominant)
        return kept_dominant, kept_contextual if contextual else 0

    def check(self, num_layers: int, vision_tokens: int | None = None) -> None:
        """Any counts fit: they are scaled to each image."""

    def check_config(self, config) -> None:
        """The tower's last block is what the port ranks with; every Qwen2.5-VL tower has one."""

    def entering_tokens(self, num_vision: int, crops: int = 1) -> int:
        return num_vision

    def prompt_tokens_per_image(self) -> int | None:
        return None

    def image_placeholders(self, model, inputs: dict) -> list[int] | None:
        return None

    def settings(self, num_vision: int) -> list[TokenMethod]:
        return [self.replace(tokens=tokens) for tokens in range(1, REFERENCE_CROP + 1)]

    def layer_modes(self, pmod_ratios) -> list[str]:
        return ["subset"] * len(pmod_ratios)

    def kept_vision_tokens(self, pmod_ratios, num_vision: int) -> list[int]:
        return [sum(self.image_counts(num_vision)) if num_vision else 0] * len(pmod_ratios)

    def ranking_flops(self, shape, num_vision: int, num_text: int) -> int:
        """The last block's q and k recomputed for the image's 4 N patches, and every query
        against every key of it (one image: one attention segment)."""
        patches, width = 4 * num_vision, shape.vision.hidden_size
        return 2 * patches * width * 2 * width + 2 * patches * patches * width

    def install(self, model, vision_tokens: int | None) -> None:
        visual = model.model.visual
        capture = _MergedCapture(visual)
        model._pmod_method_hooks += [
            visual.register_forward_pre_hook(capture.keep_grid, with_kwargs=True),
            visual.blocks[-1].attn.register_forward_pre_hook(
                capture.keep_block_input, with_kwargs=True
            ),
            visual.register_forward_hook(capture.score),
            refuse_video_hook(model, self.name),
        ]
        first_layer = model.pmod_family.decoder_layers(model)[0]
        object.__setattr__(first_layer, "visionzip_capture", capture)

    def rewrite_states(self, layer, routing, hidden_states):
        """Layer 0: each image's choice, its contextual tokens written into their targets' places."""
        vision = routing.vision_mask & routing.token_valid
        if layer.self_attn.layer_idx != 0 or not vision.any():
            return hidden_states
        check_one_image(vision, self.name)
        capture = layer.visionzip_capture
        if capture.scores is None or len(capture.scores) != int(vision.any(dim=1).sum()):
            raise RuntimeError("visionzip found no tower scores for this call's images")
        keep = routing.token_valid & ~vision
        rewritten = hidden_states.clone()
        images = iter(zip(capture.scores, capture.metrics, strict=True))
        for sample in range(hidden_states.shape[0]):
            slots = vision[sample].nonzero().view(-1)
            if slots.numel() == 0:
                continue
            scores, metric = next(images)
            kept, states = self._zip_image(hidden_states[sample, slots], scores, metric)
            rewritten[sample, slots[kept]] = states.to(hidden_states.dtype)
            keep[sample, slots[kept]] = True
        routing.method_state[self.name] = keep
        return rewritten

    def _zip_image(self, embeddings, scores, metric):
        """(kept token indices of the image, their states): the dominant tokens as they are, the
        contextual ones as target + the mean of the tokens assigned to it."""
        if scores.shape[0] != embeddings.shape[0]:
            raise RuntimeError(
                f"visionzip: {scores.shape[0]} tower scores for an image of {embeddings.shape[0]} tokens"
            )
        dominant, contextual = self.image_counts(embeddings.shape[0])
        chosen = torch.zeros(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
        chosen[scores.topk(dominant).indices] = True
        index = torch.arange(embeddings.shape[0], device=embeddings.device)
        if contextual == 0:
            return index[chosen], embeddings[chosen]
        tokens, targets = merge_contextual(
            embeddings[~chosen][None], metric[~chosen][None], contextual
        )
        kept = torch.cat([index[chosen], index[~chosen][targets]])
        return kept, torch.cat([embeddings[chosen].float(), tokens[0]])

    def select(self, layer, routing, hidden_states, position_embeddings):
        keep = routing.method_state.get(self.name)
        if keep is None:  # a decoding step: no image here
            return routing.token_valid, torch.zeros(
                routing.token_valid.shape, device=hidden_states.device
            )
        return keep, keep.float()


class _MergedCapture:
    """What Qwen2.5-VL's tower computed in its last call: per image (in order), each merged
    token's score and metric (raster order)."""

    def __init__(self, visual):
        self.visual = visual
        self.grid_thw = self.block_input = self.cu_seqlens = self.rope = None
        self.scores: list[torch.Tensor] | None = None
        self.metrics: list[torch.Tensor] | None = None

    def keep_grid(self, module, args, kwargs) -> None:
        self.grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def keep_block_input(self, module, args, kwargs) -> None:
        self.block_input = args[0] if args else kwargs["hidden_states"]
        self.cu_seqlens = kwargs["cu_seqlens"]
        self.rope = kwargs["position_embeddings"]

    def score(self, module, args, output) -> None:
        with torch.no_grad():
            received, keys = last_block_scores(
                self.visual.blocks[-1].attn, self.block_input, self.cu_seqlens, self.rope
            )
            self.scores, self.metrics = merged_token_scores(
                self.visual, self.grid_thw, received, keys
            )
        self.block_input = self.rope = None


def last_block_scores(attention, states, cu_seqlens, rope):
    """((patches,) the attention each patch receives in the block: softmax of its segment in
    fp32, mean over heads, summed over the queries; (patches, heads, head_dim) post-RoPE keys),
    in the tower's window order. ``states``: the block's attention input (after norm1)."""
    patches = states.shape[0]
    qkv = attention.qkv(states).reshape(patches, 3, attention.num_heads, -1).permute(1, 0, 2, 3)
    cos, sin = rope
    q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
    q, k = q.float(), k.float()
    received = torch.zeros(patches, device=states.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        logits = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * attention.scaling
        received[start:end] = logits.softmax(dim=-1).mean(dim=0).sum(dim=0)
    return received, k


def merged_token_scores(visual, grid_thw, received, keys):
    """Per image, (N,) scores and (N, head_dim) metrics of its merged tokens in raster order: the
    mean over each 2 x 2 group of patches (consecutive in window order), reordered as the merger's
    output is, the metric also averaged over heads."""
    window_index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
        kwargs={},
    )
    unit = visual.spatial_merge_unit
    order = torch.argsort(window_index.to(received.device))
    scores = received.view(-1, unit).mean(dim=1)[order]
    metrics = keys.view(-1, unit, *keys.shape[1:]).mean(dim=1)[order].mean(dim=1)
    sizes = (grid_thw.prod(-1) // unit).tolist()
    return list(torch.split(scores, sizes)), list(torch.split(metrics, sizes))
