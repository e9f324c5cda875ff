"""Model shapes of named reference models, or of any HF config.

A ``ModelShape`` (``families/shapes.py``) holds what the FLOPs and KV cache count needs (layer
sizes of the language model and the vision tower, the family's layout and the default numbers of
vision and text tokens), and its family builds a real HF config from it, so planning and dry runs
need no download:

    shape = get_preset("llava-next-7b")        # or read_model_shape("path/to/checkpoint")
    shape.vision_tokens                         # 2928: LLaVA-NeXT at its largest grid
    shape.video_tokens(32)                      # (tokens, crops) of a 32-frame video (OneVision)
    shape.to_hf_config()                        # a transformers LlavaNextConfig

``read_model_shape`` reads a config.json (a registered family's, dense or p-MoD) as plain JSON, so
it needs neither the model's weights nor the p-MoD Auto-class registration.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config import PMoDConfig
from .families import family_for_config, family_for_model_type, known_model_types
from .families.shapes import (
    COUNTABLE_TEXT_MODELS,
    DEFAULT_TEXT_TOKENS,
    ModelShape,
    TextShape,
    VisionShape,
)

__all__ = [
    "COUNTABLE_TEXT_MODELS",
    "DEFAULT_TEXT_TOKENS",
    "PRESETS",
    "ModelShape",
    "TextShape",
    "VisionShape",
    "get_preset",
    "read_model_shape",
    "shape_from_hf_config",
]


# ---- reference shapes ---------------------------------------------------------------------

VICUNA_7B = TextShape(
    "llama",
    num_layers=32,
    hidden_size=4096,
    intermediate_size=11008,
    num_heads=32,
    num_kv_heads=32,
    vocab_size=32000,
)
VICUNA_13B = TextShape(
    "llama",
    num_layers=40,
    hidden_size=5120,
    intermediate_size=13824,
    num_heads=40,
    num_kv_heads=40,
    vocab_size=32000,
)
QWEN2_0_5B = TextShape(
    "qwen2",
    num_layers=24,
    hidden_size=896,
    intermediate_size=4864,
    num_heads=14,
    num_kv_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
)
QWEN2_7B = TextShape(
    "qwen2",
    num_layers=28,
    hidden_size=3584,
    intermediate_size=18944,
    num_heads=28,
    num_kv_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
)
# CLIP ViT-L/14 at 336 px: 24x24 patches + CLS = 577 tokens; LLaVA takes layer -2 without CLS
CLIP_VIT_L_336 = VisionShape(
    "clip_vision_model",
    num_layers=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    image_size=336,
    patch_size=14,
)
# SigLIP-so400m/14 at 384 px: 27x27 = 729 tokens, no CLS, so LLaVA keeps them all
SIGLIP_SO400M_384 = VisionShape(
    "siglip_vision_model",
    num_layers=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    image_size=384,
    patch_size=14,
    select_strategy="full",
)
# SigLIP-so400m as llava-hf's OneVision checkpoints store it: its last layer dropped (26 of 27),
# features from the last one kept (-1): the same features as layer -2 of the whole tower
SIGLIP_SO400M_384_ONEVISION = dataclasses.replace(
    SIGLIP_SO400M_384, num_layers=26, feature_layer=-1
)
# LLaVA-OneVision's anyres_max_9 pinpoints: 1x1 to 6x6 crops of 384 px (transformers' default)
ONEVISION_PINPOINTS = tuple(
    (384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7)
)
# LLaVA-NeXT's anyres grids (height, width): 2x1, 1x2, 2x2, 3x1, 1x3 crops of the base size
NEXT_336_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
NEXT_384_PINPOINTS = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))

# ---- Qwen-VL reference shapes (the released checkpoints' config.json) ------------------------

QWEN2_5_VL_PIXELS = dict(
    max_pixels=28 * 28 * 16384,  # the image processor's max_pixels (12845056): 16384 tokens
    video_max_pixels=28 * 28 * 768,  # Qwen2VLVideoProcessor: per frame, 768 tokens a step
)
QWEN3_VL_PIXELS = dict(
    max_pixels=16777216,  # the image processor's longest_edge (4096 x 4096): 16384 tokens
    video_max_pixels=32 * 32 * 768,  # Qwen3VLVideoProcessor: all frames together
)
QWEN2_5_VL_VISION = VisionShape(
    "qwen2_5_vl_vision",
    num_layers=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    image_size=0,
    patch_size=14,
    feature_layer=-1,
    select_strategy="full",
    merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=3584,
    window_size=112,
    full_attention_layers=(7, 15, 23, 31),
)
QWEN3_VL_VISION = VisionShape(
    "qwen3_vl_vision",
    num_layers=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    image_size=0,
    patch_size=16,
    feature_layer=-1,
    select_strategy="full",
    merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=4096,
    deepstack_layers=(8, 16, 24),
    num_position_embeddings=2304,
)
QWEN2_5_VL_TEXT_7B = TextShape(
    "qwen2_5_vl_text",
    num_layers=28,
    hidden_size=3584,
    intermediate_size=18944,
    num_heads=28,
    num_kv_heads=4,
    vocab_size=152064,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
)
QWEN2_5_VL_TEXT_3B = dataclasses.replace(
    QWEN2_5_VL_TEXT_7B,
    num_layers=36,
    hidden_size=2048,
    intermediate_size=11008,
    num_heads=16,
    num_kv_heads=2,
    vocab_size=151936,
    tied_embeddings=True,
)
QWEN3_VL_TEXT_8B = TextShape(
    "qwen3_vl_text",
    num_layers=36,
    hidden_size=4096,
    intermediate_size=12288,
    num_heads=32,
    num_kv_heads=8,
    vocab_size=151936,
    head_dim=128,
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    rope_theta=5_000_000.0,
)
QWEN3_VL_TEXT_4B = dataclasses.replace(
    QWEN3_VL_TEXT_8B,
    hidden_size=2560,
    intermediate_size=9728,
    tied_embeddings=True,
)
QWEN_VL_TOKENS = dict(image_token_id=151655, video_token_id=151656)

PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape(
            "llava-1.5-7b",
            "llava",
            VICUNA_7B,
            CLIP_VIT_L_336,
            image_token_id=32000,
            description="LLaVA-1.5-7B: Vicuna-7B + CLIP ViT-L/14-336 + mlp2x_gelu, 576 vision tokens",
        ),
        ModelShape(
            "llava-1.5-13b",
            "llava",
            VICUNA_13B,
            CLIP_VIT_L_336,
            image_token_id=32000,
            description="LLaVA-1.5-13B: Vicuna-13B + CLIP ViT-L/14-336 + mlp2x_gelu, 576 vision tokens",
        ),
        ModelShape(
            "llava-next-7b",
            "llava_next",
            VICUNA_7B,
            CLIP_VIT_L_336,
            image_token_id=32000,
            image_grid_pinpoints=NEXT_336_PINPOINTS,
            description="LLaVA-NeXT-7B (Vicuna): anyres, largest grid 2x2 = 5 crops, 2928 vision tokens",
        ),
        ModelShape(
            "llava-next-13b",
            "llava_next",
            VICUNA_13B,
            CLIP_VIT_L_336,
            image_token_id=32000,
            image_grid_pinpoints=NEXT_336_PINPOINTS,
            description="LLaVA-NeXT-13B (Vicuna): anyres, largest grid 2x2 = 5 crops, 2928 vision tokens",
        ),
        ModelShape(
            "llava-onevision-qwen2-0.5b",
            "llava_onevision",
            QWEN2_0_5B,
            SIGLIP_SO400M_384_ONEVISION,
            image_token_id=151646,
            video_token_id=151647,
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            description=(
                "LLaVA-OneVision-0.5B: Qwen2-0.5B (GQA, 2 KV heads) + SigLIP-so400m-384, anyres_max_9 "
                "(largest one-image layout 8154 vision tokens); a video frame is 14x14 = 196 tokens"
            ),
        ),
        ModelShape(
            "llava-onevision-qwen2-7b",
            "llava_onevision",
            QWEN2_7B,
            SIGLIP_SO400M_384_ONEVISION,
            image_token_id=151646,
            video_token_id=151647,
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            description=(
                "LLaVA-OneVision-7B: Qwen2-7B (GQA, 4 KV heads) + SigLIP-so400m-384, anyres_max_9 "
                "(largest one-image layout 8154 vision tokens); a video frame is 14x14 = 196 tokens"
            ),
        ),
        ModelShape(
            "qwen2.5-vl-3b",
            "qwen2_5_vl",
            QWEN2_5_VL_TEXT_3B,
            dataclasses.replace(QWEN2_5_VL_VISION, out_hidden_size=2048),
            **QWEN_VL_TOKENS,
            **QWEN2_5_VL_PIXELS,
            description=(
                "Qwen2.5-VL-3B: 36 layers (GQA, 2 KV heads), windowed ViT 14 px patches merged 2x2; "
                "an image at max_pixels is 16384 vision tokens, a video 768 per 2 frames"
            ),
        ),
        ModelShape(
            "qwen2.5-vl-7b",
            "qwen2_5_vl",
            QWEN2_5_VL_TEXT_7B,
            QWEN2_5_VL_VISION,
            **QWEN_VL_TOKENS,
            **QWEN2_5_VL_PIXELS,
            description=(
                "Qwen2.5-VL-7B: 28 layers (GQA, 4 KV heads), windowed ViT 14 px patches merged 2x2; "
                "an image at max_pixels is 16384 vision tokens, a video 768 per 2 frames"
            ),
        ),
        ModelShape(
            "qwen3-vl-4b",
            "qwen3_vl",
            QWEN3_VL_TEXT_4B,
            dataclasses.replace(
                QWEN3_VL_VISION,
                num_layers=24,
                hidden_size=1024,
                intermediate_size=4096,
                out_hidden_size=2560,
                deepstack_layers=(5, 11, 17),
            ),
            **QWEN_VL_TOKENS,
            **QWEN3_VL_PIXELS,
            description=(
                "Qwen3-VL-4B: 36 layers (GQA, 8 KV heads), ViT 16 px patches merged 2x2 + DeepStack "
                "into layers 0-2; an image at max_pixels is 16384 vision tokens"
            ),
        ),
        ModelShape(
            "qwen3-vl-8b",
            "qwen3_vl",
            QWEN3_VL_TEXT_8B,
            QWEN3_VL_VISION,
            **QWEN_VL_TOKENS,
            **QWEN3_VL_PIXELS,
            description=(
                "Qwen3-VL-8B: 36 layers (GQA, 8 KV heads), ViT 16 px patches merged 2x2 + DeepStack "
                "into layers 0-2; an image at max_pixels is 16384 vision tokens"
            ),
        ),
    )
}


def get_preset(name: str) -> ModelShape:
    """The named reference shape; an unknown name is a UserError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}"
        ) from None


# ---- reading a shape from an HF config ----------------------------------------------------


def read_model_shape(path: str | Path) -> ModelShape:
    """The shape of a checkpoint directory or a config.json (dense LLaVA / LLaVA-NeXT or p-MoD).

    The file is read as JSON and turned into the transformers config class of its layout, so
    missing keys take transformers' defaults; a p-MoD config's ``pmod`` dict becomes ``shape.pmod``.
    """
    hf_config, pmod, config_file = _read_hf_config(path)
    shape = shape_from_hf_config(hf_config, name=str(path), directory=config_file.parent)
    return dataclasses.replace(shape, pmod=pmod)


def read_hf_config(path: str | Path):
    """The transformers config (dense class of its family) of a checkpoint directory or a
    config.json, without building the model; a UserError names what is wrong."""
    return _read_hf_config(path)[0]


def _read_hf_config(path: str | Path):
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        where = f"no config.json in {path}" if path.is_dir() else f"{path} does not exist"
        raise UserError(
            f"cannot read the model config: {where}; pass a checkpoint directory or its config.json"
        )
    try:
        values = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"cannot read {config_file} as JSON ({err}); pass an HF config.json"
        ) from None
    if not isinstance(values, dict):
        raise UserError(f"{config_file} is not a JSON object; pass an HF config.json")
    model_type = values.get("model_type")
    if model_type not in known_model_types():
        raise UserError(
            f"{config_file} has model_type {model_type!r}; pmod reads {', '.join(known_model_types())} configs"
        )
    family = family_for_model_type(model_type)
    pmod = None
    if model_type == family.pmod_model_type:
        try:
            pmod = PMoDConfig.from_dict(values.get("pmod") or {})
        except (TypeError, ValueError) as err:
            raise UserError(f"bad p-MoD options in {config_file}: {err}") from None

    config_class = family.dense_config_class
    hf_values = {
        k: v for k, v in values.items() if k not in ("model_type", "pmod", "architectures")
    }
    try:
        hf_config = config_class(**hf_values)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(
            f"cannot build a {config_class.__name__} from {config_file}: {err}"
        ) from None
    return hf_config, pmod, config_file


def shape_from_hf_config(config: Any, name: str = "", directory: Path | None = None) -> ModelShape:
    """The shape of a loaded transformers config of a registered family (dense or p-MoD);
    ``directory``: the checkpoint it came from (Qwen-VL reads its processors' pixel limits there)."""
    shape = family_for_config(config).shape_from_config(config, directory)
    pmod_values = getattr(config, "pmod", None)
    return dataclasses.replace(
        shape,
        name=name or getattr(config, "_name_or_path", "") or config.model_type,
        pmod=PMoDConfig.from_dict(pmod_values) if pmod_values is not None else None,
    )
