"""The tiny default's models: a tokenizer trained on the synthetic set's text, a family's tiny
builder (``ModelFamily.tiny``, the one the tests and the benchmarks use too) with the tiny
default's numbers, and saving a checkpoint with its parts.

- tokenizer: byte-level BPE trained with the ``tokenizers`` library on text in the style of the
  synthetic set (so any text still tokenizes, byte by byte at worst), with ``<s>``, ``</s>``,
  ``<pad>``, ``<image>`` and the ChatML markers as special tokens, wrapped as a
  ``PreTrainedTokenizerFast`` that adds ``<s>`` like Llama's;
- LLaVA-1.5 (``tiny:base``): a CLIP-style ViT (random init), 112 px images, 14 px patches: 8x8 = 64
  features, a small Llama, a ``LlavaProcessor`` that pads images to a square (LLaVA-1.5's "pad")
  and the ``vicuna_v1`` chat template;
- LLaVA-NeXT (``tiny:base_next``): 56 px crops in anyres grids; LLaVA-OneVision
  (``tiny:base_onevision``): a SigLIP-style tower (56 px crops: 4x4 features, 2x2 per video
  frame), a small Qwen2, ``<image>`` and ``<video>`` tokens and the ``chatml`` template;
- Qwen-VL (``tiny:base_qwen2_5_vl``, ``tiny:base_qwen3_vl``): whole checkpoints of the HF Qwen
  classes with small pixel limits (dynamic resolution: an image is 2 to 36 tokens) and the
  ``qwen_vl`` template.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, SiglipImageProcessor

from ..model.families import get_family
from ..model.families.tiny import TinySpec
from . import synthetic
from .templates import TEMPLATES, get_template

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
IMAGE_SIZE = 112
PATCH_SIZE = 14
# LLaVA-NeXT variant: a 56 px base crop and grids of up to 2x2 crops
NEXT_IMAGE_SIZE = 56
NEXT_GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
# LLaVA-OneVision variant: 56 px crops, grids of up to 2x2 crops (at most 16 + 8 x 9 = 88 tokens
# for an image alone, 17 for one of several, 4 per video frame)
ONEVISION_GRID_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]
TINY_IMAGE_SIZES = {
    "llava": IMAGE_SIZE,
    "llava_next": NEXT_IMAGE_SIZE,
    "llava_onevision": NEXT_IMAGE_SIZE,
}
TINY_GRID_PINPOINTS = {
    "llava_next": NEXT_GRID_PINPOINTS,
    "llava_onevision": ONEVISION_GRID_PINPOINTS,
}
# the text model and template of each layout's tiny variant
TINY_TEXT_MODELS = {"llava": "llama", "llava_next": "llama", "llava_onevision": "qwen2"}
TINY_TEMPLATES = {"llava": "vicuna_v1", "llava_next": "vicuna_v1", "llava_onevision": "chatml"}
# Qwen-VL variants: whole checkpoints (no parts), images of 2 to 36 merged tokens (28 px cells;
# Qwen3-VL 32 px), video steps of 2 to 16 tokens
QWEN_VL_LAYOUTS = ("qwen2_5_vl", "qwen3_vl")
QWEN_VL_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
SEED = 0

_GENERAL_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture is worth a thousand words, and a model reads them one token at a time.",
    "Describe the image in detail. What is in the picture? Where is it? How many are there?",
    "Yes. No. Left. Right. Top. Bottom. Above, below, next to, in front of, behind.",
    "0 1 2 3 4 5 6 7 8 9 10 zero one two three four five six seven eight nine ten",
    "The assistant answers the question. The user asks about the image.",
]


def build_tokenizer(
    texts: list[str] | None = None, eos_token: str = "</s>"
) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer (deterministic: same corpus, same merges).

    ``texts``: the corpus (default: the shapes set's text); ``eos_token``: the token that ends a
    reply (``<|im_end|>`` for a ChatML model, so that generation stops there).
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    system_prompts = [t.generation_prompt("<image>\nWhat is this?") for t in TEMPLATES.values()]
    corpus = synthetic.corpus() if texts is None else list(texts)
    tokenizer.train_from_iterator(corpus + _GENERAL_TEXT + system_prompts, trainer)
    bos = tokenizer.token_to_id("<s>")
    # like Llama's tokenizer: <s> starts every encoded text
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token=eos_token,
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
        padding_side="right",
    )
    fast.chat_template = get_template("vicuna_v1").jinja
    return fast


def tiny_llava(
    layout: str = "llava",
    layers: int = 6,
    hidden: int = 128,
    vision_hidden: int = 64,
    seed: int = SEED,
    image_size: int | None = None,
    vision_layers: int = 2,
    tokenizer_texts: list[str] | None = None,
    eos_token: str = "</s>",
    template: str | None = None,
):
    """A random-init tiny model of the ``layout`` family (LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision)
    and its processor.

    ``image_size`` defaults to the family's tiny size (112 px, 56 px for LLaVA-NeXT's base crop);
    ``tokenizer_texts``, ``eos_token`` and ``template`` (the chat template; default the family's
    tiny one) default to the tiny default's.
    """
    if layout not in TINY_IMAGE_SIZES:
        raise ValueError(f"layout must be one of {', '.join(TINY_IMAGE_SIZES)}, got {layout!r}")
    family = get_family(layout)
    tokenizer = build_tokenizer(tokenizer_texts, eos_token)
    if family.takes_video:
        tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]})
    chat_template = get_template(template or TINY_TEMPLATES[layout]).jinja
    tokenizer.chat_template = chat_template
    siglip = family.tiny_tower == "siglip_vision_model"
    spec = TinySpec(
        text_model=TINY_TEXT_MODELS[layout],
        layers=layers,
        hidden=hidden,
        intermediate=hidden * 11 // 4,
        max_positions=1024,
        vision_layers=vision_layers,
        vision_hidden=vision_hidden,
        vision_intermediate=vision_hidden * 4,
        vision_heads=4,
        image_size=image_size or TINY_IMAGE_SIZES[layout],
        grid_pinpoints=tuple(map(tuple, TINY_GRID_PINPOINTS.get(layout, NEXT_GRID_PINPOINTS))),
        # the family's first aspect-ratio mode: LLaVA-1.5 pads to a square, the others are anyres
        aspect_ratio=family.aspect_ratios[0],
        # SigLIP's own normalisation, to [-1, 1]
        image_mean=0.5 if siglip else None,
        image_std=0.5 if siglip else None,
        chat_template=chat_template,
        generation_ids=True,
        seed=seed,
    )
    return family.tiny(tokenizer, spec)


def tiny_qwen_vl(layout: str = "qwen2_5_vl", layers: int = 6, hidden: int = 128, seed: int = SEED):
    """A random-init tiny Qwen2.5-VL or Qwen3-VL (DeepStack after layers 0 and 1) and its
    processor, with the ``qwen_vl`` chat template."""
    base = build_tokenizer(eos_token="<|im_end|>")
    base.add_special_tokens({"additional_special_tokens": QWEN_VL_SPECIAL_TOKENS})
    # the processor takes its image / video tokens from these (LLaVA's is <image>)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        model_max_length=4096,
        padding_side="right",
    )
    chat_template = get_template("qwen_vl").jinja
    tokenizer.chat_template = chat_template
    spec = TinySpec(
        layers=layers,
        hidden=hidden,
        intermediate=hidden * 11 // 4,
        max_positions=4096,
        vision_hidden=64,
        vision_intermediate=128,
        vision_heads=4,
        max_image_tokens=36,
        max_frame_tokens=16,
        video_frames=8,
        sample_frames=False,
        chat_template=chat_template,
        generation_ids=True,
        seed=seed,
    )
    return get_family(layout).tiny(tokenizer, spec)


def save_tiny_checkpoint(path: str | Path, layout: str = "llava", **model_args) -> Path:
    """Build a tiny model of the ``layout`` family and save it (model + processor) to ``path``;
    quick, for tests."""
    path = Path(path)
    build = tiny_qwen_vl if layout in QWEN_VL_LAYOUTS else tiny_llava
    model, processor = build(layout, **model_args)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_llava_with_parts(model, processor, directory: Path) -> Path:
    """Save a tiny checkpoint and its parts: ``vision_tower/`` (a CLIP vision model with its
    image processor) and ``llm/`` (a Llama with its tokenizer), for recipes that build from parts."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    # the parts, as a "from parts" recipe names them: a CLIP tower with its image processor, an LLM
    # with its tokenizer
    model.model.vision_tower.save_pretrained(
        directory / "vision_tower"
    )  # a CLIP / SigLIP vision model
    _tower_image_processor(processor.image_processor, model.config).save_pretrained(
        directory / "vision_tower"
    )
    llm = AutoModelForCausalLM.from_config(model.config.text_config)
    llm.model.load_state_dict(model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    llm.save_pretrained(directory / "llm")
    processor.tokenizer.save_pretrained(directory / "llm")
    return directory


def _tower_image_processor(image_processor, config):
    """The image processor a vision tower of this kind ships with: the model's own for CLIP
    (LLaVA-1.5 pads, as it was trained), SigLIP's fixed square for the SigLIP-style tower."""
    if config.vision_config.model_type != "siglip_vision_model":
        return image_processor
    side = config.vision_config.image_size
    return SiglipImageProcessor(
        size={"height": side, "width": side},
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
    )
