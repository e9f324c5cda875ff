"""Model shapes: the numbers that decide cost, for named reference models or any HF config.

A ``ModelShape`` holds what the FLOPs and KV cache count needs (layer sizes of the language
model and the vision tower, the LLaVA layout and the default numbers of vision and text tokens)
and can build a real HF config from them, so planning and dry runs need no download:

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config import PMoDConfig

# decoder families whose layer is attention (q, k, v, o) + gated MLP (gate, up, down)
COUNTABLE_TEXT_MODELS = ("llama", "qwen2", "mistral", "qwen2_5_vl_text", "qwen3_vl_text")
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
# Qwen-VL's own ViTs (dynamic resolution, 2x2 patch merger; see families/qwen_vl.py)
QWEN_VL_TOWERS = ("qwen2_5_vl_vision", "qwen3_vl_vision")

# the paper's prompt length: T = 58 text tokens next to the image
DEFAULT_TEXT_TOKENS = 58


@dataclass(frozen=True)
class TextShape:
    """The language model: a decoder of attention + gated-MLP layers and an lm_head."""

    model_type: str  # "llama" | "qwen2" | "mistral"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    # only used to build a realistic HF config
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tied_embeddings: bool = False  # lm_head shares the embedding matrix (small Qwen-VL models)

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): smaller than hidden_size for grouped-query attention."""
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class VisionShape:
    """The vision tower (a ViT) and what LLaVA takes from it."""

    model_type: str  # "clip_vision_model" | "siglip_vision_model"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    image_size: int
    patch_size: int
    feature_layer: int | tuple[int, ...] = -2
    select_strategy: str = "default"  # "default" drops the first (CLS) token, "full" keeps all
    pooling_head: bool = (
        False  # SigLIP's attention-pooling head (HF runs it even though LLaVA ignores it)
    )
    num_channels: int = 3
    # Qwen-VL's ViTs (``image_size`` 0: no fixed size): merge x merge patches make one token, a
    # patch spans ``temporal_patch_size`` frames; the merger maps to ``out_hidden_size``
    merge_size: int = 1
    temporal_patch_size: int = 1
    out_hidden_size: int = 0
    window_size: int = (
        0  # Qwen2.5-VL: windowed attention (pixels) outside ``full_attention_layers``
    )
    full_attention_layers: tuple[int, ...] = ()
    deepstack_layers: tuple[int, ...] = ()  # Qwen3-VL: layers whose merged features DeepStack adds
    num_position_embeddings: int = 0  # Qwen3-VL: learned position embeddings

    @property
    def has_cls_token(self) -> bool:
        return self.model_type == "clip_vision_model"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        """Tokens inside the tower for one crop (CLIP adds a CLS token)."""
        return self.patches_per_side**2 + int(self.has_cls_token)

    @property
    def features_per_crop(self) -> int:
        """Features one crop hands to the projector."""
        return self.tokens_per_crop - int(self.select_strategy == "default")

    @property
    def num_feature_layers(self) -> int:
        return 1 if isinstance(self.feature_layer, int) else len(self.feature_layer)


@dataclass(frozen=True)
class ModelShape:
    """A model as far as its cost goes.

    ``layout`` names its model family (``model/families``): ``llava`` (one crop per image),
    ``llava_next`` (anyres: a base crop plus the crops of a grid, with one learned newline token per
    row of high-res features) or ``llava_onevision`` (anyres_max_9; video frames pooled 2x2); the
    family says how many vision tokens an image (or a video) becomes.
    ``pmod`` is the p-MoD setting stored with a checkpoint, None for a dense model or a preset.
    """

    name: str
    layout: str
    text: TextShape
    vision: VisionShape
    image_token_id: int
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # (height, width) in pixels
    text_tokens: int = DEFAULT_TEXT_TOKENS
    video_token_id: int | None = None  # families that take video (OneVision, Qwen-VL)
    # dynamic resolution (Qwen-VL): the processors' pixel limits (an image; a video's frames)
    max_pixels: int = 0
    video_max_pixels: int = 0
    description: str = ""
    pmod: PMoDConfig | None = None

    @property
    def family(self):
        """The model family (``model/families``) whose token layout this shape follows."""
        from .families import get_family

        return get_family(self.layout)

    @property
    def vision_tokens(self) -> int:
        """V: image features in the language model's input, for the largest image layout."""
        return self.family.image_tokens(self)[0]

    @property
    def vision_crops(self) -> int:
        """Crops the vision tower encodes for that layout (LLaVA-NeXT: base + grid)."""
        return self.family.image_tokens(self)[1]

    def video_tokens(self, frames: int) -> tuple[int, int]:
        """(vision tokens, crops) of a video of ``frames`` sampled frames; a UserError for a
        family that takes no video."""
        return self.family.video_tokens(self, frames)

    def to_hf_config(self, pmod: PMoDConfig | None = None):
        """The family's transformers config of this shape (random-init ready); with ``pmod``
        the family's p-MoD config class instead (``pmod_llava``, ...)."""
        config = self.family.hf_config(self, pmod)
        if pmod is not None:
            config.pmod = pmod.to_dict()
        return config


def llava_hf_config(shape: ModelShape, pmod: PMoDConfig | None = None):
    """A LLaVA-layout family's config of ``shape``: a CLIP / SigLIP tower and a Llama, Qwen2 or
    Mistral language model.

    The image token gets its own embedding row: when ``image_token_id`` lies past the checkpoint
    vocabulary (Vicuna: 32000) the HF vocabulary is padded to a multiple of 64 as llava-hf's
    conversion does (32064); the FLOPs count keeps ``text.vocab_size``.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text, vision = shape.text, shape.vision
    vocab = text.vocab_size
    last_token = max(shape.image_token_id, shape.video_token_id or 0)
    if last_token >= vocab:
        vocab = -(-(last_token + 1) // 64) * 64
    text_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[
        text.model_type
    ]
    text_config = text_class(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        head_dim=text.head_dim,
        vocab_size=vocab,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
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
    from .families import family_for_model_type, known_model_types

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
    shape = shape_from_hf_config(hf_config, name=str(path), directory=config_file.parent)
    return dataclasses.replace(shape, pmod=pmod)


def shape_from_hf_config(config: Any, name: str = "", directory: Path | None = None) -> ModelShape:
    """The shape of a loaded transformers config of a registered family (dense or p-MoD);
    ``directory``: the checkpoint it came from (Qwen-VL reads its processors' pixel limits there)."""
    from .families import family_for_config

    shape = family_for_config(config).shape_from_config(config, directory)
    pmod_values = getattr(config, "pmod", None)
    return dataclasses.replace(
        shape,
        name=name or getattr(config, "_name_or_path", "") or config.model_type,
        pmod=PMoDConfig.from_dict(pmod_values) if pmod_values is not None else None,
    )


def _text_shape(text_config) -> TextShape:
    if text_config.model_type not in COUNTABLE_TEXT_MODELS:
        raise UserError(
            f"cannot count a {text_config.model_type!r} language model; supported: {', '.join(COUNTABLE_TEXT_MODELS)}"
        )
    num_heads = text_config.num_attention_heads
    return TextShape(
        model_type=text_config.model_type,
        num_layers=text_config.num_hidden_layers,
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_heads=num_heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        vocab_size=text_config.vocab_size,
        head_dim=getattr(text_config, "head_dim", None) or 0,
        max_position_embeddings=text_config.max_position_embeddings,
        rms_norm_eps=text_config.rms_norm_eps,
        rope_theta=(getattr(text_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0),
    )


def llava_shape_from_config(config: Any) -> ModelShape:
    """The shape of a LLaVA-layout family's config (CLIP / SigLIP tower, projector, LM)."""
    from .families import family_for_config

    vision_config = config.vision_config
    if vision_config.model_type not in VISION_TOWERS:
        raise UserError(
            f"cannot count a {vision_config.model_type!r} vision tower; supported: {', '.join(VISION_TOWERS)}"
        )
    text = _text_shape(config.text_config)
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


# ---- Qwen-VL (dynamic resolution) -----------------------------------------------------------


def qwen_vl_hf_config(shape: ModelShape, pmod: PMoDConfig | None = None):
    """A Qwen2.5-VL / Qwen3-VL config of ``shape`` (its own ViT, M-RoPE language model)."""
    text, vision = shape.text, shape.vision
    family = shape.family
    config_class = family.dense_config_class if pmod is None else family.pmod_config_class
    # rotary frequencies split into temporal, height and width sections as the released models
    # do: Qwen2.5-VL [16, 24, 24], Qwen3-VL [24, 20, 20] (interleaved) of 64
    half = text.head_dim // 2
    qwen3 = vision.model_type == "qwen3_vl_vision"
    if qwen3:
        sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    else:
        sections = [half // 4, (half - half // 4) // 2, (half - half // 4) // 2]
    rope = {"rope_type": "default", "rope_theta": text.rope_theta, "mrope_section": sections}
    text_config = dict(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters=rope,
    )
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
        rope["mrope_interleaved"] = True
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
    from .families import family_for_config

    vision_config = config.vision_config
    if vision_config.model_type not in QWEN_VL_TOWERS:
        raise UserError(
            f"cannot count a {vision_config.model_type!r} vision tower; supported: {', '.join(QWEN_VL_TOWERS)}"
        )
    text = dataclasses.replace(
        _text_shape(config.text_config),
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
