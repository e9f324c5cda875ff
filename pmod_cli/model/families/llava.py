"""LLaVA-1.5: one image crop (padded to a square, or centre-cropped), CLIP/SigLIP features through
an mlp2x_gelu projector into a Llama / Vicuna, Qwen2 or Mistral language model.

``LlavaLayoutFamily`` is what LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision share: the HF config of a
shape and the shape of a config, the vision tower's FLOPs, the tiny builder and the processor's
resize settings.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from ...errors import UserError
from ..pmod_model import PMoDModelMixin
from .base import (
    ModelFamily,
    encoded_token_counts,
    family_for_config,
    features_per_crop,
    image_settings,
    register_family,
)
from .geometry import IMAGE_VIEW, PatchBox, grid_box, resize_crop
from .shapes import ModelShape, VisionShape, attention_products, text_shape
from .tiny import TinySpec, seeded_model

VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


class LlavaLayoutFamily(ModelFamily):
    """A CLIP / SigLIP tower, an mlp2x_gelu projector and a Llama, Qwen2 or Mistral language
    model (the LLaVA families; not registered itself)."""

    tiny_tower: ClassVar[str] = "clip_vision_model"  # the tower of the family's tiny models

    def hf_config(self, shape, pmod=None):
        return llava_hf_config(shape, pmod)

    def shape_from_config(self, config, directory=None):
        return llava_shape_from_config(config)

    def vision_encoder_flops(self, shape, vision_tokens: int, crops: int) -> dict[str, int]:
        vision, d = shape.vision, shape.text.hidden_size
        # the projector runs on every crop's features (a video's before they are pooled)
        projected = crops * vision.features_per_crop
        projector_in = vision.hidden_size * vision.num_feature_layers
        return {
            "vision_tower": crops * vision_tower_flops_per_crop(vision),
            # mlp2x_gelu: Linear(vision_hidden, d) -> GELU -> Linear(d, d)
            "projector": 2 * projected * (projector_in * d + d * d),
        }

    # ---- tiny models ----------------------------------------------------------------------

    def tiny_model(self, spec: TinySpec, vocab_size: int, token_ids: dict[str, int | None]):
        text_ids = {k: v for k, v in token_ids.items() if k in _TEXT_TOKEN_IDS}
        media_ids = {k: v for k, v in token_ids.items() if k not in _TEXT_TOKEN_IDS}
        vision_config = _tiny_tower_config(spec, self.tiny_tower)
        config = self.dense_config_class(
            vision_config=vision_config,
            text_config=_tiny_text_config(spec, vocab_size, text_ids),
            vision_feature_layer=spec.feature_layer,
            vision_feature_select_strategy=_select_strategy(vision_config),
            projector_hidden_act="gelu",
            image_seq_length=(spec.image_size // vision_config.patch_size) ** 2,
            tie_word_embeddings=False,
            **media_ids,
            **self.config_options([list(p) for p in spec.grid_pinpoints]),
        )
        return seeded_model(self.dense_model_class, config, spec)

    def tiny_processor(self, tokenizer, config, spec: TinySpec):
        side = spec.image_size
        settings: dict[str, Any] = {
            "size": {"shortest_edge": side},
            "crop_size": {"height": side, "width": side},
        }
        if spec.image_mean is not None:
            settings.update(image_mean=[spec.image_mean] * 3, image_std=[spec.image_std] * 3)
        vision_config = config.vision_config
        return self.build_processor(
            tokenizer,
            self.tiny_image_processor(settings, spec),
            vision_config,
            _select_strategy(vision_config),
            spec.chat_template,
        )

    def tiny_image_processor(self, settings: dict[str, Any], spec: TinySpec):
        """The image processor of a tiny model: the family's first aspect-ratio mode's."""
        pinpoints = [list(p) for p in spec.grid_pinpoints]
        return self.image_processor(settings, spec.aspect_ratio or self.aspect_ratios[0], pinpoints)


class PMoDLlavaConfig(LlavaConfig):
    model_type = "pmod_llava"
    pmod: dict | None = None
    pmod_method: dict | None = None  # another method the layers run (TokenMethod.to_dict)


class PMoDLlavaForConditionalGeneration(PMoDModelMixin, LlavaForConditionalGeneration):
    config_class = PMoDLlavaConfig


@register_family
class LlavaFamily(LlavaLayoutFamily):
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

    def tiny_image_processor(self, settings: dict[str, Any], spec: TinySpec):
        if spec.aspect_ratio is None:  # the CLIP tower's own, as llava-hf's checkpoints ship it
            return CLIPImageProcessor(**settings)
        return self.image_processor(settings, spec.aspect_ratio, None)

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


# ---- where each vision token sits ------------------------------------------------------------


def processor_geometry(processor, model_config) -> dict[str, Any]:
    """The image processor's resize / crop settings and the tower's patch size."""
    image_processor = processor.image_processor
    return dict(
        patch_size=model_config.vision_config.patch_size,
        size=image_processor.size,
        crop_size=image_processor.crop_size
        if getattr(image_processor, "do_center_crop", False)
        else None,
        do_resize=bool(getattr(image_processor, "do_resize", True)),
    )


def llava_patch_boxes(
    image_height: int,
    image_width: int,
    *,
    patch_size: int,
    size: Any,
    crop_size: Any | None,
    do_resize: bool = True,
    pad_to_square: bool = False,
    with_cls: bool = False,
) -> list[PatchBox | None]:
    """One box per LLaVA-1.5 vision token, in token order (``None`` for a kept CLS token).

    ``CLIPImageProcessor`` / ``LlavaImageProcessor``: optional pad-to-square, resize (shortest
    edge or fixed size), center crop; token j is patch (j // grid, j % grid) of the crop.
    """
    chain = resize_crop(
        image_height,
        image_width,
        size=size,
        crop_size=crop_size,
        do_resize=do_resize,
        pad_to_square=pad_to_square,
    )
    rows, cols = chain.view_height // patch_size, chain.view_width // patch_size
    boxes: list[PatchBox | None] = [None] if with_cls else []
    boxes += [
        grid_box(chain, IMAGE_VIEW, row, col, patch_size)
        for row in range(rows)
        for col in range(cols)
    ]
    return boxes


# ---- shapes and FLOPs ------------------------------------------------------------------------


def llava_hf_config(shape: ModelShape, pmod=None):
    """A LLaVA-layout family's config of ``shape``: a CLIP / SigLIP tower and a Llama, Qwen2 or
    Mistral language model.

    The image token gets its own embedding row: when ``image_token_id`` lies past the checkpoint
    vocabulary (Vicuna: 32000) the HF vocabulary is padded to a multiple of 64 as llava-hf's
    conversion does (32064); the FLOPs count keeps ``text.vocab_size``.
    """
    text, vision = shape.text, shape.vision
    vocab = text.vocab_size
    last_token = max(shape.image_token_id, shape.video_token_id or 0)
    if last_token >= vocab:
        vocab = -(-(last_token + 1) // 64) * 64
    text_config = TEXT_CONFIGS[text.model_type](
        **text.hf_text_kwargs(),
        head_dim=text.head_dim,
        vocab_size=vocab,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta},
        tie_word_embeddings=False,
    )
    vision_kwargs = dict(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        num_channels=vision.num_channels,
    )
    if vision.model_type == "clip_vision_model":
        vision_config = CLIPVisionConfig(**vision_kwargs)
    else:
        vision_config = SiglipVisionConfig(vision_use_head=vision.pooling_head, **vision_kwargs)
    feature_layer = vision.feature_layer
    if not isinstance(feature_layer, int):
        feature_layer = list(feature_layer)
    family = shape.family
    config_class = family.dense_config_class if pmod is None else family.pmod_config_class
    token_ids = {"video_token_id": shape.video_token_id} if shape.video_token_id is not None else {}
    config = config_class(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=shape.image_token_id,
        **token_ids,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=vision.select_strategy,
        projector_hidden_act="gelu",  # mlp2x_gelu
        image_seq_length=vision.features_per_crop,
        tie_word_embeddings=False,
        **family.config_options([list(p) for p in shape.image_grid_pinpoints]),
    )
    return config


def llava_shape_from_config(config: Any) -> ModelShape:
    """The shape of a LLaVA-layout family's config (CLIP / SigLIP tower, projector, LM)."""
    vision_config = config.vision_config
    if vision_config.model_type not in VISION_TOWERS:
        raise UserError(
            f"cannot count a {vision_config.model_type!r} vision tower; supported: {', '.join(VISION_TOWERS)}"
        )
    text = text_shape(config.text_config)
    feature_layer = config.vision_feature_layer
    vision = VisionShape(
        model_type=vision_config.model_type,
        num_layers=vision_config.num_hidden_layers,
        hidden_size=vision_config.hidden_size,
        intermediate_size=vision_config.intermediate_size,
        num_heads=vision_config.num_attention_heads,
        image_size=vision_config.image_size,
        patch_size=vision_config.patch_size,
        feature_layer=feature_layer if isinstance(feature_layer, int) else tuple(feature_layer),
        select_strategy=config.vision_feature_select_strategy,
        pooling_head=bool(getattr(vision_config, "vision_use_head", False)),
        num_channels=vision_config.num_channels,
    )
    pinpoints = tuple(tuple(p) for p in getattr(config, "image_grid_pinpoints", None) or ())
    family = family_for_config(config)
    video_token_id = getattr(config, "video_token_id", None) if family.takes_video else None
    return ModelShape(
        name=config.model_type,
        layout=family.name,
        text=text,
        vision=vision,
        image_token_id=config.image_token_id,
        image_grid_pinpoints=pinpoints,
        video_token_id=video_token_id,
    )


def vision_tower_flops_per_crop(vision: VisionShape) -> int:
    """One crop through the ViT: patch embedding, every layer (HF runs them all, whichever
    layer LLaVA reads), and SigLIP's attention-pooling head when present."""
    h, m, n = vision.hidden_size, vision.intermediate_size, vision.tokens_per_crop
    patches = vision.patches_per_side**2
    patch_embedding = 2 * patches * vision.num_channels * vision.patch_size**2 * h
    # q, k, v, o (h x h) + fc1, fc2 (h x m); attention is bidirectional: every pair
    per_layer = 2 * n * (4 * h * h + 2 * h * m) + attention_products(n * n, h)
    total = patch_embedding + vision.num_layers * per_layer
    if vision.pooling_head:
        # one probe query: q and out projections on 1 token, k and v on n, then an MLP on 1 token
        total += 2 * (2 * h * h + 2 * n * h * h + 2 * h * m) + attention_products(n, h)
    return total


# ---- the tiny builder's parts ------------------------------------------------------------------

_TEXT_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
TINY_PATCH = 14


def _tiny_tower_config(spec: TinySpec, tower: str):
    common = dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=TINY_PATCH,
    )
    if tower == "siglip_vision_model":  # no CLS token, so every patch is a feature ("full")
        return SiglipVisionConfig(**common, vision_use_head=False)
    return CLIPVisionConfig(**common, projection_dim=spec.vision_hidden)


def _tiny_text_config(spec: TinySpec, vocab_size: int, token_ids: dict[str, int | None]):
    options = {"sliding_window": None} if spec.text_model == "mistral" else {}
    return TEXT_CONFIGS[spec.text_model](
        **spec.text_kwargs(),
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        **token_ids,
        **options,
    )


def _select_strategy(vision_config) -> str:
    # CLIP's first token is its CLS token, which LLaVA drops; SigLIP has none
    return "default" if vision_config.model_type.startswith("clip") else "full"
