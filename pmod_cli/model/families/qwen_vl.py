"""What Qwen2.5-VL and Qwen3-VL share: dynamic-resolution vision tokens with 3-D rotary positions.

Both families' processors resize each image to a multiple of ``patch_size * merge_size`` within
their pixel limits, cut it into ``(t, h, w)`` patches (``image_grid_thw``; an image has t = 1, a
video one t per ``temporal_patch_size`` frames) and merge ``merge_size x merge_size`` patches into
one vision token: an image of grid (1, h, w) becomes h * w / merge**2 tokens, a video t times as
many. The prompt holds ``<|vision_start|><|image_pad|><|vision_end|>`` and the processor expands the
pad token; ``mm_token_type_ids`` tells the model which token is text, image or video, from which it
computes the 3-D positions (M-RoPE: temporal, height, width) of every token.

p-MoD needs nothing of its own for the positions: the model computes the (cos, sin) of every token
from its original 3-D position before the first layer, and a MoD layer gathers its kept tokens'
rows of them (``layer._gather_kept``). Generation continues from the model's own ``rope_deltas``,
which p-MoD does not touch; the cache reports the full sequence length (``cache.PMoDCacheLayer``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import Qwen2VLImageProcessor

from ...errors import UserError
from .base import ModelFamily, family_for_config
from .geometry import FRAME_VIEW, IMAGE_VIEW, PatchBox, cell_boxes
from .shapes import ModelShape, VisionShape, attention_products, text_shape
from .tiny import TinySpec, seeded_model

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
# what a prompt holds where an image or a video goes (the processor expands the pad token)
IMAGE_PLACEHOLDER = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
VIDEO_PLACEHOLDER = f"{VISION_START}{VIDEO_PAD}{VISION_END}"
# Qwen-VL's own ViTs (dynamic resolution, 2x2 patch merger)
QWEN_VL_TOWERS = ("qwen2_5_vl_vision", "qwen3_vl_vision")


class QwenVLFamily(ModelFamily):
    """The common part of the Qwen-VL families (not registered itself)."""

    media_tokens: ClassVar[dict[str, str]] = {
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
    }
    aspect_ratios = ("dynamic",)  # the processor's own pixel limits; no pad / crop / anyres
    # the patch merger(s) (Qwen3-VL: also the DeepStack mergers) sit inside the vision tower
    connector_parameters = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
    vision_tower_parameters = ("model.visual.",)
    grouping_inputs = ("image_grid_thw", "video_grid_thw")
    builds_from_parts = (
        False  # trained from a whole checkpoint (its ViT, merger and LM belong together)
    )
    fallback_template = "qwen_vl"
    default_templates: ClassVar[dict[str, str]] = {}

    def media_placeholder(self, processor, kind: str) -> str:
        return {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}[kind]

    def media_expansion(self, processor, kind: str, count: int, own: str | None = None) -> str:
        # the processor replaces the pad token of the placeholder; the markers around it stay
        return VISION_START + (own or getattr(processor, f"{kind}_token") * count) + VISION_END

    def token_types(self, processor) -> dict[int, int] | None:
        # the model computes 3-D positions only where it is told which tokens are image / video
        return {processor.image_token_id: 1, processor.video_token_id: 2}

    def decoder_layers(self, model) -> torch.nn.ModuleList:
        return model.model.language_model.layers

    def template_name(self, text_model_type: str) -> str:
        return self.fallback_template

    def vision_token_groups(self, config, inputs: dict[str, Any]) -> list[tuple[int, list[int]]]:
        """Each image is one group; each video is one group per temporal patch (2 frames)."""
        merge = config.vision_config.spatial_merge_size
        images = _grid_token_counts(inputs.get("image_grid_thw"), merge, per_frame=False)
        videos = _grid_token_counts(inputs.get("video_grid_thw"), merge, per_frame=True)
        return [(config.image_token_id, images), (config.video_token_id, videos)]

    # ---- shapes and counting ----------------------------------------------------------------

    # the released processors' pixel limits, when a checkpoint's own are not at hand
    default_max_pixels: ClassVar[int]
    default_video_max_pixels: ClassVar[int]

    def hf_config(self, shape, pmod=None):
        return qwen_vl_hf_config(shape, pmod)

    def shape_from_config(self, config, directory=None):
        image_limit = _processor_max_pixels(directory, "image_processor")
        video_limit = _processor_max_pixels(directory, "video_processor")
        return qwen_vl_shape_from_config(
            config,
            max_pixels=image_limit or self.default_max_pixels,
            video_max_pixels=video_limit or self.default_video_max_pixels,
        )

    def image_tokens(self, shape) -> tuple[int, int]:
        """The largest image the processor makes: ``max_pixels`` of merged patches."""
        vision = shape.vision
        return dynamic_image_tokens(shape.max_pixels, vision.patch_size, vision.merge_size), 1

    def video_tokens(self, shape, frames: int) -> tuple[int, int]:
        """(tokens, temporal patches) of ``frames`` sampled frames at the video pixel limit (per
        frame pair, as Qwen2VLVideoProcessor applies it)."""
        vision = shape.vision
        steps = max(1, -(-frames // vision.temporal_patch_size))
        per_step = dynamic_image_tokens(
            shape.video_max_pixels, vision.patch_size, vision.merge_size
        )
        return per_step * steps, steps

    def vision_encoder_flops(self, shape, vision_tokens: int, crops: int) -> dict[str, int]:
        """The ViT over the merged tokens' patches (each image / temporal patch attends within
        itself) and the patch merger(s)."""
        return qwen_vl_vision_flops(shape, vision_tokens, crops)

    def frame_boxes(
        self, processor, config, frame_height: int, frame_width: int, frames: int = 2
    ) -> list:
        return qwen_vl_frame_boxes(processor, config, frame_height, frame_width, frames)

    def set_video_frames(self, video_processor, frames: int) -> None:
        video_processor.num_frames = frames
        # the frames are already spread over the video; Qwen3-VL's processor would sample them
        # again at its fps (and refuses num_frames next to fps)
        video_processor.do_sample_frames = False

    def frames_per_step(self, processor) -> int:
        return processor.video_processor.temporal_patch_size

    def patch_boxes(self, processor, config, image_height: int, image_width: int) -> list:
        return qwen_vl_patch_boxes(processor, config, image_height, image_width)

    # ---- tiny models: 2x2-merged patches, images of 2 to ``max_image_tokens`` tokens ----------

    tiny_patch: ClassVar[int]  # the ViT's patch size (pixels)
    tiny_vision_options: ClassVar[dict[str, Any]]  # the tiny ViT's own (windows, DeepStack)
    video_processor_class: ClassVar[type]
    frames_share_pixel_limit: ClassVar[bool] = False  # Qwen3-VL: one limit for all frames
    interleaved_mrope: ClassVar[bool] = False  # Qwen3-VL: M-RoPE sections interleaved

    def tiny_token_ids(self, tokenizer, spec: TinySpec) -> dict[str, int | None]:
        ids = super().tiny_token_ids(tokenizer, spec)
        ids["vision_start_token_id"] = tokenizer.convert_tokens_to_ids(VISION_START)
        ids["vision_end_token_id"] = tokenizer.convert_tokens_to_ids(VISION_END)
        return ids

    def tiny_model(self, spec: TinySpec, vocab_size: int, token_ids: dict[str, int | None]):
        text_keys = ("pad_token_id", "bos_token_id", "eos_token_id")
        head_dim = spec.hidden // spec.heads
        text = dict(
            **spec.text_kwargs(),
            vocab_size=vocab_size,
            head_dim=head_dim,
            rope_parameters=_mrope(head_dim, 10000.0, interleaved=self.interleaved_mrope),
            **{key: value for key, value in token_ids.items() if key in text_keys},
        )
        vision = dict(
            depth=spec.vision_layers,
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_intermediate,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden,
            patch_size=self.tiny_patch,
            **self.tiny_vision_options,
        )
        config = self.dense_config_class(
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=False,
            **{key: value for key, value in token_ids.items() if key not in text_keys},
        )
        return seeded_model(self.dense_model_class, config, spec)

    def tiny_processor(self, tokenizer, config, spec: TinySpec):
        patch = config.vision_config.patch_size
        factor = patch * 2
        geometry = dict(patch_size=patch, merge_size=2, temporal_patch_size=2)
        image_processor = Qwen2VLImageProcessor(
            size={
                "shortest_edge": factor * factor * 2,
                "longest_edge": factor * factor * spec.max_image_tokens,
            },
            **geometry,
        )
        frames = spec.video_frames if self.frames_share_pixel_limit else 1
        sampling = {} if spec.sample_frames is None else {"do_sample_frames": spec.sample_frames}
        video_processor = self.video_processor_class(
            size={
                "shortest_edge": factor * factor * 2,
                "longest_edge": factor * factor * spec.max_frame_tokens * frames,
            },
            **sampling,
            **geometry,
        )
        return self.processor_class(
            image_processor=image_processor,
            video_processor=video_processor,
            tokenizer=tokenizer,
            chat_template=spec.chat_template,
        )


def _grid_token_counts(grid_thw: torch.Tensor | None, merge: int, per_frame: bool) -> list[int]:
    """Tokens of each image (or of each temporal patch of each video) from its ``(t, h, w)`` grid."""
    if grid_thw is None:
        return []
    counts = []
    for t, h, w in grid_thw.tolist():
        per_step = h * w // (merge * merge)
        counts += [per_step] * t if per_frame else [t * per_step]
    return counts


def _processor_max_pixels(directory, kind: str) -> int | None:
    """``size.longest_edge`` (or ``max_pixels``) of a checkpoint's saved ``kind`` processor
    (``image_processor`` / ``video_processor``): in processor_config.json (transformers 5), else
    in its own file; None when there is none."""
    if directory is None:
        return None
    legacy = {"image_processor": "preprocessor_config.json"}.get(
        kind, f"{kind.split('_')[0]}_preprocessor_config.json"
    )
    for filename, key in (("processor_config.json", kind), (legacy, None)):
        path = Path(directory) / filename
        try:
            values = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            values = None
        if isinstance(values, dict) and key is not None:
            values = values.get(key)
        if isinstance(values, dict):
            limit = (values.get("size") or {}).get("longest_edge") or values.get("max_pixels")
            if limit:
                return int(limit)
    return None


def dynamic_image_tokens(max_pixels: int, patch_size: int, merge_size: int) -> int:
    """Vision tokens of an image at ``max_pixels``: the most merged patches that fit in it."""
    factor = patch_size * merge_size
    return max_pixels // (factor * factor)


# ---- shapes and FLOPs ------------------------------------------------------------------------


def qwen_vl_hf_config(shape: ModelShape, pmod=None):
    """A Qwen2.5-VL / Qwen3-VL config of ``shape`` (its own ViT, M-RoPE language model)."""
    text, vision = shape.text, shape.vision
    family = shape.family
    config_class = family.dense_config_class if pmod is None else family.pmod_config_class
    qwen3 = vision.model_type == "qwen3_vl_vision"
    rope = _mrope(text.head_dim, text.rope_theta, interleaved=qwen3)
    text_config = dict(**text.hf_text_kwargs(), vocab_size=text.vocab_size, rope_parameters=rope)
    vision_config = dict(
        depth=vision.num_layers,
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_heads=vision.num_heads,
        patch_size=vision.patch_size,
        spatial_merge_size=vision.merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        out_hidden_size=vision.out_hidden_size,
    )
    if qwen3:
        text_config["head_dim"] = text.head_dim
        vision_config.update(
            deepstack_visual_indexes=list(vision.deepstack_layers),
            num_position_embeddings=vision.num_position_embeddings,
        )
    else:
        vision_config.update(
            window_size=vision.window_size, fullatt_block_indexes=list(vision.full_attention_layers)
        )
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=shape.image_token_id,
        video_token_id=shape.video_token_id,
        tie_word_embeddings=text.tied_embeddings,
    )


def qwen_vl_shape_from_config(config: Any, max_pixels: int, video_max_pixels: int) -> ModelShape:
    """The shape of a Qwen-VL config, with the processors' pixel limits (which the config lacks)."""
    vision_config = config.vision_config
    if vision_config.model_type not in QWEN_VL_TOWERS:
        raise UserError(
            f"cannot count a {vision_config.model_type!r} vision tower; supported: {', '.join(QWEN_VL_TOWERS)}"
        )
    text = dataclasses.replace(
        text_shape(config.text_config),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
    qwen3 = vision_config.model_type == "qwen3_vl_vision"
    vision = VisionShape(
        model_type=vision_config.model_type,
        num_layers=vision_config.depth,
        hidden_size=vision_config.hidden_size,
        intermediate_size=vision_config.intermediate_size,
        num_heads=vision_config.num_heads,
        image_size=0,
        patch_size=vision_config.patch_size,
        feature_layer=-1,
        select_strategy="full",
        num_channels=vision_config.in_channels,
        merge_size=vision_config.spatial_merge_size,
        temporal_patch_size=vision_config.temporal_patch_size,
        out_hidden_size=vision_config.out_hidden_size,
        window_size=0 if qwen3 else vision_config.window_size,
        full_attention_layers=() if qwen3 else tuple(vision_config.fullatt_block_indexes),
        deepstack_layers=tuple(vision_config.deepstack_visual_indexes) if qwen3 else (),
        num_position_embeddings=vision_config.num_position_embeddings if qwen3 else 0,
    )
    return ModelShape(
        name=config.model_type,
        layout=family_for_config(config).name,
        text=text,
        vision=vision,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        max_pixels=max_pixels,
        video_max_pixels=video_max_pixels,
    )


def _mrope(head_dim: int, rope_theta: float, interleaved: bool = False) -> dict[str, Any]:
    """M-RoPE's rotary frequencies split into temporal, height and width sections as the released
    models do: Qwen2.5-VL [16, 24, 24], Qwen3-VL [24, 20, 20] (``interleaved``) of 64."""
    half = head_dim // 2
    if interleaved:
        sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    else:
        sections = [half // 4, (half - half // 4) // 2, (half - half // 4) // 2]
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": sections}
    if interleaved:
        rope["mrope_interleaved"] = True
    return rope


def qwen_vl_vision_flops(shape: ModelShape, vision_tokens: int, crops: int) -> dict[str, int]:
    """Qwen-VL's ViT and merger: ``vision_tokens`` merged tokens are merge**2 patches each, over
    ``crops`` images / temporal patches that each attend within themselves (Qwen2.5-VL: within
    windows of window_size pixels, except ``full_attention_layers``). The merger is LayerNorm +
    Linear(merge**2 h, merge**2 h) + GELU + Linear(merge**2 h, out); Qwen3-VL runs one more per
    DeepStack layer."""
    vision = shape.vision
    h, m = vision.hidden_size, vision.intermediate_size
    patches = vision_tokens * vision.merge_size**2
    per_crop = patches // max(crops, 1)
    patch_volume = vision.num_channels * vision.temporal_patch_size * vision.patch_size**2
    patch_embedding = 2 * patches * patch_volume * h
    mlp_matrices = 3 if vision.model_type == "qwen2_5_vl_vision" else 2  # gated MLP in 2.5
    linear = 2 * patches * (4 * h * h + mlp_matrices * h * m)
    full_pairs = crops * per_crop * per_crop
    window_patches = (vision.window_size // vision.patch_size) ** 2 if vision.window_size else 0
    attention = 0
    for layer in range(vision.num_layers):
        windowed = window_patches and layer not in vision.full_attention_layers
        pairs = patches * min(window_patches, per_crop) if windowed else full_pairs
        attention += attention_products(pairs, h)
    merged = h * vision.merge_size**2
    mergers = 1 + len(vision.deepstack_layers)
    return {
        "vision_tower": patch_embedding + vision.num_layers * linear + attention,
        "projector": mergers
        * 2
        * vision_tokens
        * (merged * merged + merged * vision.out_hidden_size),
    }


# ---- where each vision token sits ------------------------------------------------------------


def qwen_vl_patch_boxes(processor, config, image_height: int, image_width: int) -> list[PatchBox]:
    """Qwen2.5-VL / Qwen3-VL: the image is resized (aspect kept, no pad or crop) to multiples of
    patch * merge within the processor's pixel limits, and each merged token covers one
    (patch * merge)-pixel cell of it, row by row."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    height, width = smart_resize(
        image_height,
        image_width,
        factor=factor,
        min_pixels=image_processor.size["shortest_edge"],
        max_pixels=image_processor.size["longest_edge"],
    )
    return cell_boxes(IMAGE_VIEW, image_height, image_width, height, width, factor)


def qwen_vl_frame_boxes(
    processor, config, frame_height: int, frame_width: int, frames: int = 2
) -> list[PatchBox]:
    """One temporal patch (``temporal_patch_size`` frames) of a video: its frames resized as the
    video processor does (Qwen3-VL caps the pixels of all ``frames`` together), one token per
    (patch * merge)-pixel cell."""
    video_processor = processor.video_processor
    factor = video_processor.patch_size * video_processor.merge_size
    limits = dict(
        min_pixels=video_processor.size["shortest_edge"],
        max_pixels=video_processor.size["longest_edge"],
    )
    if config.model_type.endswith("qwen3_vl"):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        height, width = smart_resize(
            frames,
            frame_height,
            frame_width,
            temporal_factor=video_processor.temporal_patch_size,
            factor=factor,
            **limits,
        )
    else:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

        height, width = smart_resize(frame_height, frame_width, factor=factor, **limits)
    return cell_boxes(FRAME_VIEW, frame_height, frame_width, height, width, factor)
