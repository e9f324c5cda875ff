"""LLaVA-NeXT (LLaVA-1.6): anyres. A base crop of the whole image plus the crops of the best grid
of ``image_grid_pinpoints``; the high-resolution features are unpadded and each of their rows ends
in a learned newline token (``image_newline``), which counts as a vision token."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from ...errors import UserError
from ..pmod_model import PMoDModelMixin
from .anyres import anyres_tokens
from .base import ModelFamily, encoded_token_counts, register_family


class PMoDLlavaNextConfig(LlavaNextConfig):
    model_type = "pmod_llava_next"
    pmod: dict | None = None
    pmod_method: dict | None = None  # a baseline method the layers run (methods.MethodConfig)


class PMoDLlavaNextForConditionalGeneration(PMoDModelMixin, LlavaNextForConditionalGeneration):
    config_class = PMoDLlavaNextConfig


@register_family
class LlavaNextFamily(ModelFamily):
    name = "llava_next"
    title = "LLaVA-NeXT"
    dense_config_class = LlavaNextConfig
    dense_model_class = LlavaNextForConditionalGeneration
    pmod_config_class = PMoDLlavaNextConfig
    pmod_model_class = PMoDLlavaNextForConditionalGeneration
    processor_class = LlavaNextProcessor
    aspect_ratios = ("anyres",)
    connector_parameters = ("model.multi_modal_projector.", "model.image_newline")

    def config_options(self, image_grid_pinpoints: list[list[int]] | None) -> dict[str, Any]:
        if not image_grid_pinpoints:
            raise UserError('model.layout = "llava_next" needs model.image_grid_pinpoints')
        return {"image_grid_pinpoints": [list(p) for p in image_grid_pinpoints]}

    def image_processor(self, settings: dict[str, Any], aspect_ratio: str, grid_pinpoints) -> Any:
        return LlavaNextImageProcessor(**settings, image_grid_pinpoints=grid_pinpoints)

    def init_new_connector(self, model, dtype: torch.dtype) -> None:
        hidden = model.config.text_config.hidden_size
        model.model.image_newline = nn.Parameter(
            torch.randn(hidden, dtype=dtype) / math.sqrt(hidden)
        )

    def vision_token_groups(self, config, inputs: dict[str, Any]) -> list[tuple[int, list[int]]]:
        counts = encoded_token_counts(inputs, "image")
        if counts is not None:
            return [(config.image_token_id, counts)]
        image_sizes = inputs.get("image_sizes")
        sizes = [] if image_sizes is None else image_sizes.tolist()
        vision = config.vision_config
        counts = [
            anyres_tokens(
                height,
                width,
                grid_pinpoints=config.image_grid_pinpoints,
                tile_size=vision.image_size,
                side=vision.image_size // vision.patch_size,
            )[0]
            for height, width in sizes
        ]
        return [(config.image_token_id, counts)]

    def image_tokens(self, shape) -> tuple[int, int]:
        return max(
            _grid_tokens(shape, height, width) for height, width in shape.image_grid_pinpoints
        )

    def patch_boxes(self, processor, config, image_height: int, image_width: int) -> list:
        from ...visualization.patches import llava_next_patch_boxes, processor_geometry

        strategy = config.vision_feature_select_strategy
        if strategy != "default":
            raise UserError(
                f"pmod visualize maps LLaVA-NeXT tokens for vision_feature_select_strategy 'default', not {strategy!r}"
            )
        return llava_next_patch_boxes(
            image_height,
            image_width,
            grid_pinpoints=config.image_grid_pinpoints,
            tile_size=config.vision_config.image_size,
            **processor_geometry(processor, config),
        )


def _grid_tokens(shape, height: int, width: int) -> tuple[int, int]:
    """(vision tokens, crops) of an image that fills the grid (height, width) exactly."""
    vision = shape.vision
    side = vision.patches_per_side
    rows, cols = height // vision.image_size, width // vision.image_size
    # high-res features are (rows*side, cols*side), one newline token closes each row
    high_res = rows * side * (cols * side + 1)
    return vision.features_per_crop + high_res, 1 + rows * cols
