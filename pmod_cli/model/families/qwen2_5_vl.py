"""Qwen2.5-VL: a windowed ViT whose 2x2-merged patches (an MLP merger) go into a Qwen2.5 language
model with 3-D rotary positions (M-RoPE); images at their own resolution within the processor's
pixel limits, and video (two frames per temporal patch, temporal positions spaced by the frame
rate). Image and video tokens compete for the same budget (or, with ``PMoDConfig.budget =
"image"``, one per image and one per temporal patch of a video). See ``qwen_vl.py``.
"""

from __future__ import annotations

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLVideoProcessor,
)

from ..pmod_model import PMoDModelMixin
from .base import register_family
from .qwen_vl import QwenVLFamily


class PMoDQwen2_5_VLConfig(Qwen2_5_VLConfig):
    model_type = "pmod_qwen2_5_vl"
    pmod: dict | None = None
    pmod_method: dict | None = None  # another method the layers run (TokenMethod.to_dict)


class PMoDQwen2_5_VLForConditionalGeneration(PMoDModelMixin, Qwen2_5_VLForConditionalGeneration):
    config_class = PMoDQwen2_5_VLConfig


@register_family
class Qwen2_5_VLFamily(QwenVLFamily):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    dense_config_class = Qwen2_5_VLConfig
    dense_model_class = Qwen2_5_VLForConditionalGeneration
    pmod_config_class = PMoDQwen2_5_VLConfig
    pmod_model_class = PMoDQwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor
    text_model_types = ("qwen2_5_vl_text",)
    vision_model_types = ("qwen2_5_vl_vision",)
    default_max_pixels = 28 * 28 * 16384  # Qwen2.5-VL's image processor: 12845056
    default_video_max_pixels = 28 * 28 * 768  # Qwen2VLVideoProcessor, per frame
    tiny_patch = 14
    tiny_vision_options = {"window_size": 56, "fullatt_block_indexes": [1]}
    video_processor_class = Qwen2VLVideoProcessor
