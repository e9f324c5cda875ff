"""Qwen3-VL: a ViT with learned position embeddings whose 2x2-merged patches go into a Qwen3
language model with interleaved 3-D rotary positions (M-RoPE), plus DeepStack: features of some
middle ViT layers, merged the same way, are added to the hidden states at the vision positions
after each of the first language layers (one set per layer). Video frames are grouped two per
temporal patch, each group after its own timestamp text. See ``qwen_vl.py``.

DeepStack and MoD layers: transformers adds the features after the decoder layer returns, to the
full sequence at ``visual_pos_masks``. A MoD layer returns the full sequence too (skipped tokens
passed through, kept ones scattered back to their places), so every vision token, kept or skipped
by that layer, receives its own feature, exactly as in the dense model; p-MoD changes nothing there
(``tests/test_qwen_vl.py`` checks it against the features added by hand).
"""

from __future__ import annotations

from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from ..pmod_model import PMoDModelMixin
from .base import register_family
from .qwen_vl import QwenVLFamily


class PMoDQwen3VLConfig(Qwen3VLConfig):
    model_type = "pmod_qwen3_vl"
    pmod: dict | None = None
    pmod_method: dict | None = None  # another method the layers run (TokenMethod.to_dict)


class PMoDQwen3VLForConditionalGeneration(PMoDModelMixin, Qwen3VLForConditionalGeneration):
    config_class = PMoDQwen3VLConfig


@register_family
class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3_vl"
    title = "Qwen3-VL"
    dense_config_class = Qwen3VLConfig
    dense_model_class = Qwen3VLForConditionalGeneration
    pmod_config_class = PMoDQwen3VLConfig
    pmod_model_class = PMoDQwen3VLForConditionalGeneration
    processor_class = Qwen3VLProcessor
    text_model_types = ("qwen3_vl_text",)
    vision_model_types = ("qwen3_vl_vision",)
    unsupported_methods = {
        "fastv": "its attention normalises q and k per head after the projections FastV ranks with"
    }
    default_max_pixels = 16777216  # Qwen3-VL's image processor (longest_edge)
    default_video_max_pixels = 32 * 32 * 768  # Qwen3VLVideoProcessor, all frames together
    tiny_patch = 16
    tiny_vision_options = {"num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}
    video_processor_class = Qwen3VLVideoProcessor
    frames_share_pixel_limit = True
    interleaved_mrope = True

    def video_texts(self, processor, videos) -> list[str] | None:
        """Its processor writes a timestamp and vision markers before each temporal patch of a
        video: that text, from the processor's own replacement of the video token."""
        if not videos:
            return None
        processed = processor.video_processor(videos=list(videos), return_metadata=True)
        return [processor.replace_video_token(processed, index) for index in range(len(videos))]

    def video_tokens(self, shape, frames: int) -> tuple[int, int]:
        """(tokens, temporal patches): Qwen3VLVideoProcessor caps the pixels of all sampled
        frames together, so a longer video gets smaller frames."""
        vision = shape.vision
        steps = max(1, -(-frames // vision.temporal_patch_size))
        factor = vision.patch_size * vision.merge_size
        per_step = shape.video_max_pixels // (steps * vision.temporal_patch_size * factor * factor)
        return max(1, per_step) * steps, steps
