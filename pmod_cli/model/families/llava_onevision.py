"""LLaVA-OneVision: SigLIP features through an mlp2x_gelu projector into Qwen2 (Llama and Mistral
language models work too), for

- one image: anyres_max_9, a base crop plus the crops of the best grid, whose unpadded feature map
  is shrunk back to about 9 crops' worth when larger; each high-res row ends in a newline token;
- several images in one sample: each image padded to a square, one crop, one newline token;
- video: every sampled frame is one crop whose features are pooled 2x2 (bilinear, as the model
  does), frames one after the other, and one newline token closes the video.

Image tokens (``<image>``) and video tokens (``<video>``) are all vision tokens: they compete for the
same budget (one per sample, or with ``PMoDConfig.budget = "image"`` one per image and per frame).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from ...errors import UserError
from ..pmod_model import PMoDModelMixin
from .base import encoded_token_counts, features_per_crop, register_family
from .geometry import (
    BASE_VIEW,
    FRAME_VIEW,
    HIGH_RES_VIEW,
    IMAGE_VIEW,
    PatchBox,
    anyres_layout,
    anyres_tokens,
    capped_map_size,
    grid_box,
    max_crops_of,
    resize_crop,
    size_field,
)
from .llava import LlavaLayoutFamily

ASPECT_RATIO = "anyres_max_9"


class PMoDLlavaOnevisionConfig(LlavaOnevisionConfig):
    model_type = "pmod_llava_onevision"
    pmod: dict | None = None


class PMoDLlavaOnevisionForConditionalGeneration(
    PMoDModelMixin, LlavaOnevisionForConditionalGeneration
):
    config_class = PMoDLlavaOnevisionConfig


@register_family
class LlavaOnevisionFamily(LlavaLayoutFamily):
    name = "llava_onevision"
    title = "LLaVA-OneVision"
    dense_config_class = LlavaOnevisionConfig
    dense_model_class = LlavaOnevisionForConditionalGeneration
    pmod_config_class = PMoDLlavaOnevisionConfig
    pmod_model_class = PMoDLlavaOnevisionForConditionalGeneration
    processor_class = LlavaOnevisionProcessor
    aspect_ratios = (ASPECT_RATIO,)
    connector_parameters = ("model.multi_modal_projector.", "model.image_newline")
    media_tokens = {"image_token_id": "<image>", "video_token_id": "<video>"}
    fallback_template = "chatml"
    tiny_tower = "siglip_vision_model"

    # ---- building -------------------------------------------------------------------------

    def config_options(self, image_grid_pinpoints: list[list[int]] | None) -> dict[str, Any]:
        options: dict[str, Any] = {"vision_aspect_ratio": ASPECT_RATIO}
        if image_grid_pinpoints:  # else transformers' default: 1x1 to 6x6 crops of 384 px
            options["image_grid_pinpoints"] = [list(p) for p in image_grid_pinpoints]
        return options

    def image_processor(self, settings: dict[str, Any], aspect_ratio: str, grid_pinpoints) -> Any:
        options = (
            {"image_grid_pinpoints": [list(p) for p in grid_pinpoints]} if grid_pinpoints else {}
        )
        return LlavaOnevisionImageProcessor(**_square_settings(settings), **options)

    def build_processor(
        self, tokenizer, image_processor, vision_config, select_strategy: str, chat_template: str
    ):
        # frames go through the tower at the image crop size, normalised like images
        video_processor = LlavaOnevisionVideoProcessor(
            size=dict(image_processor.size),
            image_mean=image_processor.image_mean,
            image_std=image_processor.image_std,
            resample=image_processor.resample,
        )
        side = vision_config.image_size // vision_config.patch_size
        return self.processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            # the processor subtracts one under "default" (CLIP's CLS token)
            num_image_tokens=side * side + int(vision_config.model_type.startswith("clip")),
            vision_feature_select_strategy=select_strategy,
            image_token=self.media_tokens["image_token_id"],
            video_token=self.media_tokens["video_token_id"],
            vision_aspect_ratio=ASPECT_RATIO,
            chat_template=chat_template,
        )

    def init_new_connector(self, model, dtype: torch.dtype) -> None:
        hidden = model.config.text_config.hidden_size
        model.model.image_newline = nn.Parameter(
            torch.randn(hidden, dtype=dtype) / math.sqrt(hidden)
        )

    # ---- which token belongs to which image or frame ----------------------------------------

    def vision_token_groups(self, config, inputs: dict[str, Any]) -> list[tuple[int, list[int]]]:
        images = encoded_token_counts(inputs, "image")
        if images is None:
            images = image_token_counts(
                config, inputs.get("image_sizes"), inputs.get("batch_num_images")
            )
        videos = encoded_token_counts(inputs, "video")
        if videos is None:
            videos = video_token_counts(config, inputs.get("pixel_values_videos"))
        return [
            (config.image_token_id, images),
            (config.video_token_id, frame_token_counts(config, videos)),
        ]

    # ---- counting ---------------------------------------------------------------------------

    def image_tokens(self, shape) -> tuple[int, int]:
        """The largest one-image layout: the pinpoint grid whose capped map is largest."""
        vision = shape.vision
        return max(
            anyres_tokens(
                height,
                width,
                grid_pinpoints=shape.image_grid_pinpoints,
                tile_size=vision.image_size,
                side=vision.patches_per_side,
                max_crops=max_crops_of(ASPECT_RATIO),
            )
            for height, width in shape.image_grid_pinpoints
        )

    def video_tokens(self, shape, frames: int) -> tuple[int, int]:
        pooled = math.ceil(shape.vision.patches_per_side / 2) ** 2
        return frames * pooled + 1, frames

    video_extra_tokens = 1  # the newline closing a video

    def patch_boxes(self, processor, config, image_height: int, image_width: int) -> list:
        return onevision_patch_boxes(processor, config, image_height, image_width)

    def several_image_boxes(self, processor, config, image_height: int, image_width: int) -> list:
        return onevision_several_image_boxes(processor, config, image_height, image_width)

    def frame_boxes(
        self, processor, config, frame_height: int, frame_width: int, frames: int = 1
    ) -> list:
        return onevision_frame_boxes(processor, config, frame_height, frame_width)


def _square_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A vision tower's processor settings as OneVision's: a fixed square size, no centre crop."""
    crop = settings.get("crop_size") or {}
    side = crop.get("height") or settings["size"].get("height") or settings["size"]["shortest_edge"]
    normalisation = {
        key: settings[key] for key in ("image_mean", "image_std", "resample") if key in settings
    }  # a tiny model's processor may keep the processor's defaults
    return dict(size={"height": side, "width": side}, **normalisation)


def image_token_counts(config, image_sizes: torch.Tensor | None, batch_num_images) -> list[int]:
    """Vision tokens of each image of a batch, in order: an image alone in its sample is anyres
    (capped by ``vision_aspect_ratio``), one of several is a base crop and a newline."""
    if image_sizes is None:
        return []
    sizes = image_sizes.tolist()
    per_sample = (
        [1] * len(sizes) if batch_num_images is None else [int(n) for n in batch_num_images]
    )
    alone = [n == 1 for n in per_sample for _ in range(n)]
    vision = config.vision_config
    counts = []
    for (height, width), single in zip(sizes, alone, strict=True):
        if single:
            counts.append(
                anyres_tokens(
                    height,
                    width,
                    grid_pinpoints=config.image_grid_pinpoints,
                    tile_size=vision.image_size,
                    side=vision.image_size // vision.patch_size,
                    max_crops=max_crops_of(config.vision_aspect_ratio),
                )[0]
            )
        else:
            counts.append(features_per_crop(config) + 1)
    return counts


def video_token_counts(config, pixel_values_videos: torch.Tensor | None) -> list[int]:
    """Vision tokens of each video of a batch: its frames' pooled tokens and a closing newline."""
    if pixel_values_videos is None:
        return []
    videos, frames = pixel_values_videos.shape[:2]  # (videos, frames, 3, height, width)
    return [frames * pooled_frame_tokens(config) + 1] * videos


def pooled_frame_tokens(config) -> int:
    """Tokens of one video frame: its features pooled 2x2 (ceil(side / 2) squared)."""
    return math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2) ** 2


def frame_token_counts(config, video_token_counts: list[int]) -> list[int]:
    """Vision tokens of each frame of each video, in order, from each video's token count (the
    video's closing newline counts with its last frame)."""
    pooled = pooled_frame_tokens(config)
    counts = []
    for tokens in video_token_counts:
        frames = (tokens - 1) // pooled
        counts += [pooled] * (frames - 1) + [pooled + 1]
    return counts


# ---- where each vision token sits ------------------------------------------------------------
#
# LlavaOnevisionImageProcessor / VideoProcessor + LlavaOnevisionModel: an image alone is
# LLaVA-NeXT's layout with the base view squashed to the crop size and the unpadded map shrunk
# (bilinear) to about 9 crops when larger, so a high-res token then covers a proportionally larger
# cell; one of several images is padded to a square and squashed to one crop, then a newline; a
# video frame is squashed to one crop whose features are pooled 2x2, and one newline closes the
# video (PatchBox.source says which picture a box lies on).


def _square_size(processor_part) -> int:
    """The fixed square size OneVision's image and video processors resize to."""
    size = processor_part.size
    height, width = size_field(size, "height"), size_field(size, "width")
    if not height or height != width:
        raise UserError(
            f"pmod visualize maps OneVision tokens for a square processor size, not {size}"
        )
    return height


def onevision_patch_boxes(
    processor, config, image_height: int, image_width: int
) -> list[PatchBox | None]:
    """One box per vision token of an image alone (anyres_max_9), in token order; ``None`` for the
    row newlines. The high-res map may have been shrunk: a token covers its share of the map."""
    patch, tile = config.vision_config.patch_size, config.vision_config.image_size
    if _square_size(processor.image_processor) != tile:
        raise UserError(
            "pmod visualize maps OneVision tokens when the processor's crop size is the tower's input size"
        )
    side = tile // patch
    base_chain = resize_crop(
        image_height, image_width, size={"height": tile, "width": tile}, crop_size=None
    )
    boxes: list[PatchBox | None] = [
        grid_box(base_chain, BASE_VIEW, r, c, patch) for r in range(side) for c in range(side)
    ]
    layout = anyres_layout(
        image_height,
        image_width,
        grid_pinpoints=config.image_grid_pinpoints,
        tile_size=tile,
        cells_per_tile=side,
    )
    rows, cols = layout.rows, layout.cols
    map_height, map_width = capped_map_size(
        len(rows), len(cols), side, max_crops_of(config.vision_aspect_ratio)
    )
    row_step, col_step = len(rows) / map_height, len(cols) / map_width  # map cells per token
    unresize_x, unresize_y = (
        image_width / layout.resized_width,
        image_height / layout.resized_height,
    )

    def to_image(col: float, row: float) -> tuple[float, float]:
        # tiles go to the tower at their own size: one map cell is one patch of the padded image
        return (col * patch - layout.paste_left) * unresize_x, (
            row * patch - layout.paste_top
        ) * unresize_y

    for row in range(map_height):
        for col in range(map_width):
            x0, y0 = to_image(cols.start + col * col_step, rows.start + row * row_step)
            x1, y1 = to_image(cols.start + (col + 1) * col_step, rows.start + (row + 1) * row_step)
            boxes.append(PatchBox(HIGH_RES_VIEW, x0, y0, x1, y1))
        boxes.append(None)  # the row's newline token
    return boxes


def onevision_several_image_boxes(
    processor, config, image_height: int, image_width: int
) -> list[PatchBox | None]:
    """An image among several: padded to a square, squashed to one crop, then one newline."""
    patch, side = config.vision_config.patch_size, _square_size(processor.image_processor)
    chain = resize_crop(
        image_height,
        image_width,
        size={"height": side, "width": side},
        crop_size=None,
        pad_to_square=True,
    )
    cells = side // patch
    return [
        grid_box(chain, IMAGE_VIEW, r, c, patch) for r in range(cells) for c in range(cells)
    ] + [None]


def onevision_frame_boxes(processor, config, frame_height: int, frame_width: int) -> list[PatchBox]:
    """One video frame: squashed to one crop, its features pooled to ceil(cells / 2) per side."""
    patch, side = config.vision_config.patch_size, _square_size(processor.video_processor)
    chain = resize_crop(
        frame_height, frame_width, size={"height": side, "width": side}, crop_size=None
    )
    cells = side // patch
    pooled = math.ceil(cells / 2)
    step = cells / pooled * patch  # view pixels per pooled token
    boxes = []
    for row in range(pooled):
        for col in range(pooled):
            x0, y0 = chain.to_source(col * step, row * step)
            x1, y1 = chain.to_source((col + 1) * step, (row + 1) * step)
            boxes.append(PatchBox(FRAME_VIEW, x0, y0, x1, y1))
    return boxes
