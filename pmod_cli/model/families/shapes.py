"""Model shapes: the numbers that decide cost.

A ``ModelShape`` holds what the FLOPs and KV cache count needs (layer sizes of the language
model and the vision tower, the family's layout and the default numbers of vision and text
tokens); its family builds a real HF config from it (``to_hf_config``) and reads one back
(``ModelFamily.shape_from_config``). The named reference shapes are in ``model/presets.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import UserError
from .base import get_family

if TYPE_CHECKING:
    from ..config import PMoDConfig

# decoder families whose layer is attention (q, k, v, o) + gated MLP (gate, up, down)
COUNTABLE_TEXT_MODELS = ("llama", "qwen2", "mistral", "qwen2_5_vl_text", "qwen3_vl_text")

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

    def hf_text_kwargs(self) -> dict[str, Any]:
        """This decoder's numbers as a transformers text config names them (the family adds its
        vocabulary, RoPE, token ids and, where its config takes one, ``head_dim``)."""
        return dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
        )

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


def text_shape(text_config: Any) -> TextShape:
    """The ``TextShape`` of a transformers text config (a UserError for a decoder pmod cannot count)."""
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


def attention_products(pairs: int, width: int) -> int:
    """FLOPs of Q @ K^T and A @ V over ``pairs`` query-key pairs; ``width`` = heads * head_dim."""
    return 2 * 2 * pairs * width
