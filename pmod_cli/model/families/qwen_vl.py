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

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import ModelFamily

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
# what a prompt holds where an image or a video goes (the processor expands the pad token)
IMAGE_PLACEHOLDER = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
VIDEO_PLACEHOLDER = f"{VISION_START}{VIDEO_PAD}{VISION_END}"


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
        from ..presets import qwen_vl_hf_config

        return qwen_vl_hf_config(shape, pmod)

    def shape_from_config(self, config, directory=None):
        from ..presets import qwen_vl_shape_from_config

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
        from ...efficiency.flops import qwen_vl_vision_flops

        return qwen_vl_vision_flops(shape, vision_tokens, crops)

    def frame_boxes(
        self, processor, config, frame_height: int, frame_width: int, frames: int = 2
    ) -> list:
        from ...visualization.patches import qwen_vl_frame_boxes

        return qwen_vl_frame_boxes(processor, config, frame_height, frame_width, frames)

    def set_video_frames(self, video_processor, frames: int) -> None:
        video_processor.num_frames = frames
        # the frames are already spread over the video; Qwen3-VL's processor would sample them
        # again at its fps (and refuses num_frames next to fps)
        video_processor.do_sample_frames = False

    def frames_per_step(self, processor) -> int:
        return processor.video_processor.temporal_patch_size

    def patch_boxes(self, processor, config, image_height: int, image_width: int) -> list:
        from ...visualization.patches import qwen_vl_patch_boxes

        return qwen_vl_patch_boxes(processor, config, image_height, image_width)


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
