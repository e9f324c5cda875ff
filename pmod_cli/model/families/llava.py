"""LLaVA-1.5: one image crop (padded to a square, or centre-cropped), CLIP/SigLIP features through
an mlp2x_gelu projector into a Llama / Vicuna, Qwen2 or Mistral language model."""

from __future__ import annotations

from typing import Any

from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
)

from ..pmod_model import PMoDModelMixin
from .base import (
    ModelFamily,
    encoded_token_counts,
    features_per_crop,
    image_settings,
    register_family,
)


class PMoDLlavaConfig(LlavaConfig):
    model_type = "pmod_llava"
    pmod: dict | None = None
    pmod_method: dict | None = None  # a baseline method the layers run (methods.MethodConfig)


class PMoDLlavaForConditionalGeneration(PMoDModelMixin, LlavaForConditionalGeneration):
    config_class = PMoDLlavaConfig


@register_family
class LlavaFamily(ModelFamily):
    name = "llava"
    title = "LLaVA-1.5"
    dense_config_class = LlavaConfig
    dense_model_class = LlavaForConditionalGeneration
    pmod_config_class = PMoDLlavaConfig
    pmod_model_class = PMoDLlavaForConditionalGeneration
    processor_class = LlavaProcessor
    aspect_ratios = ("pad", "crop")
    single_grid_images = True

    def image_processor(self, settings: dict[str, Any], aspect_ratio: str, grid_pinpoints) -> Any:
        return LlavaImageProcessor(**settings, do_pad=aspect_ratio == "pad")

    def adapt_image_processor(self, image_processor, aspect_ratio: str) -> Any:
        # pad or crop as the recipe says, with the checkpoint's own sizes
        return self.image_processor(image_settings(image_processor), aspect_ratio, None)

    def vision_token_groups(self, config, inputs: dict[str, Any]) -> list[tuple[int, list[int]]]:
        counts = encoded_token_counts(inputs, "image")
        if counts is None:
            pixel_values = inputs.get("pixel_values")
            counts = [features_per_crop(config)] * (
                0 if pixel_values is None else pixel_values.shape[0]
            )
        return [(config.image_token_id, counts)]

    def image_tokens(self, shape) -> tuple[int, int]:
        return shape.vision.features_per_crop, 1

    def patch_boxes(self, processor, config, image_height: int, image_width: int) -> list:
        from ...visualization.patches import llava_patch_boxes, processor_geometry

        image_processor = processor.image_processor
        # LlavaImageProcessor's do_pad pads to a square first (LLaVA-1.5's "pad" aspect mode);
        # other processors' do_pad only pads batches, which a single image never needs
        pad_to_square = hasattr(image_processor, "pad_to_square") and bool(
            getattr(image_processor, "do_pad", False)
        )
        return llava_patch_boxes(
            image_height,
            image_width,
            pad_to_square=pad_to_square,
            with_cls=config.vision_feature_select_strategy == "full",
            **processor_geometry(processor, config),
        )
