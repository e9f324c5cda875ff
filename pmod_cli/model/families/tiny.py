"""The numbers of a tiny random-init model, which each family builds (``ModelFamily.tiny``).

One builder per family serves the tiny default (``data/tiny_build.py``), the tests
(``tests/tiny_models.py``) and the benchmarks (``benchmarks/bench_core.py``): hidden 32-512,
1-16 layers, no download, seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinySpec:
    """The numbers of a tiny random-init model of a family (``ModelFamily.tiny``).

    The defaults are the tests' models (seconds on a CPU); the tiny default
    (``data/tiny_build.py``) and the benchmarks set their own. Fields a family does not use are
    ignored (Qwen-VL has its own language model and 14 / 16 px patches).
    """

    # the language model (LLaVA layouts: a Llama, Qwen2 or Mistral decoder)
    text_model: str = "llama"
    layers: int = 4
    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 512
    # the vision tower (LLaVA layouts: CLIP-style, OneVision SigLIP-style, 14 px patches)
    vision_layers: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_heads: int = 2
    image_size: int = 56  # the tower's input crop (LLaVA layouts)
    feature_layer: int = -2
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # (height, width): LLaVA-NeXT, OneVision
    # the processor
    aspect_ratio: str | None = None  # LLaVA-1.5: "pad" / "crop"; None: the CLIP tower's own
    image_mean: float | None = None  # per channel (OneVision's SigLIP: 0.5); None: the default
    image_std: float | None = None
    max_image_tokens: int = 16  # Qwen-VL: the image processor's pixel limit, in merged tokens
    max_frame_tokens: int = 6  # Qwen-VL: the video processor's, per frame
    video_frames: int = 4  # Qwen3-VL: the frames its video limit covers together
    sample_frames: bool | None = (
        None  # Qwen-VL: the video processor's do_sample_frames (None: its own)
    )
    chat_template: str | None = None  # Jinja, saved with the processor
    # the config: the tokenizer's bos / eos in the text config (generation stops at eos)
    generation_ids: bool = False
    seed: int = 0
    attn: str | None = None  # attention implementation (None: transformers' choice)

    def text_kwargs(self) -> dict[str, int]:
        """The language model's numbers as a transformers text config names them."""
        return dict(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions,
        )


def seeded_model(model_class, config, spec: TinySpec):
    """``model_class(config)`` initialised from ``spec.seed`` (eval mode), with ``spec.attn``."""
    if spec.attn:
        config.text_config._attn_implementation = spec.attn
    torch.manual_seed(spec.seed)
    model = model_class(config)
    if spec.attn:
        model.set_attn_implementation(spec.attn)
    return model.eval()
