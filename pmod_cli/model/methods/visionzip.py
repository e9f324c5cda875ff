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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from .base import MethodError, TokenMethod, register_method

FAMILIES = ("llava", "llava_next")


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
        if family.name not in FAMILIES:
            raise MethodError(
                f"visionzip compresses a CLIP tower's crops before the projector (LLaVA-1.5, LLaVA-NeXT); "
                f"it does not run on {family.title}"
            )

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
    metric = metric / metric.norm(dim=-1, keepdim=True)
    rest = hidden[~chosen].view(crops, remaining, width).float()
    step = max(1, remaining // contextual)
    targets = torch.arange(0, remaining, step, device=hidden.device)[:contextual]
    is_target = torch.zeros(remaining, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    similarity = metric[:, ~is_target] @ metric[:, targets].transpose(1, 2)  # (crops, others, C)
    assign = F.one_hot(similarity.argmax(dim=2), contextual).float()  # (crops, others, C)
    counts = assign.sum(dim=1).clamp(min=1)[..., None]  # (crops, C, 1)
    merged = assign.transpose(1, 2) @ rest[:, ~is_target] / counts  # mean of the assigned
    contextual_tokens = (rest[:, targets] + merged).to(hidden.dtype)
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), chosen


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
