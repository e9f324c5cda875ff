"""``downsample``: each image resized to ``(w // k, h // k)`` (bicubic) before the processor, the
baseline VTC-Bench found stronger than many token-reduction methods (``Chenfei-Liao/VTC-Bench``
@983e443, its Qwen2-VL lmms-eval wrapper: ``visual.resize((w // k, h // k), Image.BICUBIC)``).

The processor then makes fewer vision tokens where its count depends on the image's size
(Qwen-VL's dynamic resolution: about 1 / k**2 of them; LLaVA-NeXT / OneVision: anyres picks a
smaller grid); every layer is dense. Its V is the downsampled image's, as the processor lays it
out: the FLOPs and KV count of a run is that of the dense model on the smaller image. Videos are
not downsampled (as VTC-Bench). LLaVA-1.5 is refused: its processor resizes every image to the
tower's fixed crop, so downsampling changes no count there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .base import MethodError, TokenMethod, register_method

QWEN_VL_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@register_method
@dataclass(frozen=True)
class Downsample(TokenMethod):
    """Options: ``factor`` (k, an integer: each image becomes (w // k, h // k) pixels)."""

    name = "downsample"
    title = "downsample resizes each image to 1/k of its width and height (bicubic) before the processor"
    factor: int = 2

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise MethodError(
                f"downsample's factor k must be an integer of at least 1, got {self.factor}"
            )

    @property
    def label(self) -> str:
        return f"downsample 1/{self.factor}"

    def check_family(self, family) -> None:
        super().check_family(family)
        if family.single_grid_images:
            raise MethodError(
                f"downsample changes no token count on {family.title}: its processor resizes every image to "
                "the tower's fixed crop; use pool or visionzip there"
            )

    def prepare_images(self, images: list) -> list:
        return [downsampled(image, self.factor) for image in images]

    def vision_layout(self, shape) -> tuple[int, int]:
        """The family's largest image, downsampled: Qwen-VL's ``max_pixels`` / k**2 (in merged
        patches; the processor's lower pixel limit is not applied, it only matters below about
        56 x 56 px); LLaVA-NeXT / OneVision: the largest grid's image at 1/k per side, through
        the family's own count (anyres picks its grid at that size)."""
        vision, k = shape.vision, self.factor
        if shape.layout in QWEN_VL_FAMILIES:
            cell = vision.patch_size * vision.merge_size
            return max(1, shape.max_pixels // k**2 // cell**2), 1
        if not shape.image_grid_pinpoints:  # one fixed crop: the same count at any size
            return shape.vision_tokens, shape.vision_crops
        config = shape.to_hf_config()

        def tokens(height: int, width: int) -> int:
            sizes = torch.tensor([[height, width]])
            return shape.family.vision_token_groups(config, {"image_sizes": sizes})[0][1][0]

        height, width = max(shape.image_grid_pinpoints, key=lambda size: tokens(*size))
        small = (max(1, height // k), max(1, width // k))
        crops = image_size_to_num_patches(small, config.image_grid_pinpoints, vision.image_size)
        return tokens(*small), crops


def downsampled(image, factor: int) -> Image.Image:
    """``image`` (PIL, or an (h, w, 3) array) at ``(w // factor, h // factor)``, bicubic."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if factor == 1:
        return image
    width, height = image.size
    size = (max(1, width // factor), max(1, height // factor))
    return image.resize(size, resample=Image.BICUBIC)
