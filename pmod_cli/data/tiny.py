"""The embedded tiny default: a small LLaVA built locally, with no network, in a few seconds.

- tokenizer: byte-level BPE trained with the ``tokenizers`` library on text in the style of the
  synthetic set (so any text still tokenizes, byte by byte at worst), with ``<s>``, ``</s>``,
  ``<pad>``, ``<image>`` and the ChatML markers as special tokens, wrapped as a
  ``PreTrainedTokenizerFast`` that adds ``<s>`` like Llama's;
- vision tower: a CLIP-style ViT (random init), 112 px images, 14 px patches: 8x8 = 64 features;
- language model: a small Llama (random init);
- assembled as an HF ``LlavaForConditionalGeneration`` with a ``LlavaProcessor`` that pads
  images to a square (LLaVA-1.5's "pad") and the ``vicuna_v1`` chat template.

The LLaVA-NeXT variant (``tiny:base_next``) takes 56 px crops in anyres grids; the LLaVA-OneVision
variant (``tiny:base_onevision``) a SigLIP-style tower (56 px crops: 4x4 features, 2x2 per video
frame), a small Qwen2, ``<image>`` and ``<video>`` tokens and the ``chatml`` template. The
Qwen-VL variants (``tiny:base_qwen2_5_vl``, ``tiny:base_qwen3_vl``) are whole checkpoints of the
HF Qwen classes with small pixel limits (dynamic resolution: an image is 2 to 36 tokens) and the
``qwen_vl`` template.

``build_tiny_base(path)`` writes the checkpoint (loadable with ``from_pretrained``) with its parts
in ``path/vision_tower`` and ``path/llm`` so recipes can also build a model "from parts".
Assets the recipes name as ``tiny:<relative path>`` (``tiny:base``, ``tiny:shapes/sft_train.json``,
``tiny:media/sft_train.json``) live in the pmod cache (``$PMOD_CACHE`` or ``~/.cache/pmod``) and
are built on first use.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from ..errors import UserError
from . import media, synthetic
from .cache import build_once
from .templates import TEMPLATES, get_template

# bump when the tiny base changes, so cached copies are rebuilt
TINY_VERSION = 1
TINY_PREFIX = "tiny:"

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
# tiny:<name> -> layout of the base checkpoint
TINY_BASES = {
    "base": "llava",
    "base_next": "llava_next",
    "base_onevision": "llava_onevision",
    "base_qwen2_5_vl": "qwen2_5_vl",
    "base_qwen3_vl": "qwen3_vl",
}
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


def cache_root() -> Path:
    return Path(os.environ.get("PMOD_CACHE") or Path.home() / ".cache" / "pmod")


def tiny_root() -> Path:
    return cache_root() / f"tiny-v{TINY_VERSION}"


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


def _text_config(
    tokenizer: PreTrainedTokenizerFast, layers: int, hidden: int, model_type: str = "llama"
):
    config_class = Qwen2Config if model_type == "qwen2" else LlamaConfig
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _vision_config(image_size: int, hidden: int, layers: int = 2, siglip: bool = False):
    common = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH_SIZE,
    )
    if siglip:  # no CLS token, so every patch is a feature ("full")
        return SiglipVisionConfig(**common, vision_use_head=False)
    return CLIPVisionConfig(**common, projection_dim=hidden)


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
    from ..model.families import get_family

    if layout not in TINY_IMAGE_SIZES:
        raise ValueError(f"layout must be one of {', '.join(TINY_IMAGE_SIZES)}, got {layout!r}")
    family = get_family(layout)
    tokenizer = build_tokenizer(tokenizer_texts, eos_token)
    if family.takes_video:
        tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]})
    template = template or TINY_TEMPLATES[layout]
    tokenizer.chat_template = get_template(template).jinja
    image_size = image_size or TINY_IMAGE_SIZES[layout]
    siglip = layout == "llava_onevision"
    select_strategy = "full" if siglip else "default"
    torch.manual_seed(seed)
    vision_config = _vision_config(image_size, vision_hidden, vision_layers, siglip)
    media_token_ids = {
        key: tokenizer.convert_tokens_to_ids(token) for key, token in family.media_tokens.items()
    }
    config = family.dense_config_class(
        vision_config=vision_config,
        text_config=_text_config(tokenizer, layers, hidden, TINY_TEXT_MODELS[layout]),
        vision_feature_layer=-2,
        vision_feature_select_strategy=select_strategy,
        projector_hidden_act="gelu",
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
        **media_token_ids,
        **family.config_options(TINY_GRID_PINPOINTS.get(layout, NEXT_GRID_PINPOINTS)),
    )
    model = family.dense_model_class(config)
    # the family's first aspect-ratio mode: LLaVA-1.5 pads to a square, the others are anyres
    sizes = {
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
    }
    if siglip:  # SigLIP's own normalisation, to [-1, 1]
        sizes.update(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
    image_processor = family.image_processor(
        sizes, family.aspect_ratios[0], TINY_GRID_PINPOINTS.get(layout, NEXT_GRID_PINPOINTS)
    )
    processor = family.build_processor(
        tokenizer,
        image_processor,
        vision_config,
        select_strategy,
        get_template(template).jinja,
    )
    return model.eval(), processor


def tiny_qwen_vl(layout: str = "qwen2_5_vl", layers: int = 6, hidden: int = 128, seed: int = SEED):
    """A random-init tiny Qwen2.5-VL or Qwen3-VL (DeepStack after layers 0 and 1) and its
    processor, with the ``qwen_vl`` chat template."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

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
    tokenizer.chat_template = get_template("qwen_vl").jinja
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_VL_SPECIAL_TOKENS}
    head_dim = hidden // 4
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    half = head_dim // 2
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=hidden
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if layout == "qwen2_5_vl":
        patch = 14
        sections = [half // 4, (half - half // 4) // 2, (half - half // 4) // 2]
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": sections,
        }
        vision.update(patch_size=patch, window_size=56, fullatt_block_indexes=[1])
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        )
        classes = (Qwen2_5_VLProcessor, Qwen2VLVideoProcessor)
    else:
        patch = 16
        sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": sections,
            "mrope_interleaved": True,
        }
        vision.update(patch_size=patch, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        model = Qwen3VLForConditionalGeneration(
            Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
        )
        classes = (Qwen3VLProcessor, Qwen3VLVideoProcessor)
    factor = patch * 2
    geometry = dict(patch_size=patch, merge_size=2, temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": factor * factor * 2, "longest_edge": factor * factor * 36},
        **geometry,
    )
    frames = 1 if layout == "qwen2_5_vl" else 8  # Qwen3-VL caps all frames together
    video_processor = classes[1](
        size={"shortest_edge": factor * factor * 2, "longest_edge": factor * factor * 16 * frames},
        do_sample_frames=False,
        **geometry,
    )
    processor = classes[0](
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=get_template("qwen_vl").jinja,
    )
    return model.eval(), processor


def save_tiny_checkpoint(path: str | Path, layout: str = "llava", **model_args) -> Path:
    """Build a tiny model of the ``layout`` family and save it (model + processor) to ``path``;
    quick, for tests."""
    path = Path(path)
    build = tiny_qwen_vl if layout in QWEN_VL_LAYOUTS else tiny_llava
    model, processor = build(layout, **model_args)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_base(path: str | Path | None = None, layout: str = "llava") -> Path:
    """The tiny default base checkpoint, with its parts in ``vision_tower/`` and ``llm/``.

    Deterministic (fixed seeds). With ``path=None`` it goes to the pmod cache and is built only
    once: concurrent ranks wait for the first one, which writes to a temporary directory renamed
    into place (``cache.build_once``); a complete copy in place is never replaced.
    """
    name = next(name for name, base_layout in TINY_BASES.items() if base_layout == layout)
    final = Path(path) if path is not None else tiny_root() / name
    return build_once(
        final, is_complete=_has_config, build=partial(_write_tiny_base, layout=layout)
    )


def _has_config(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def _write_tiny_base(directory: Path, layout: str) -> None:
    from ..model.loading import quiet_progress_bars

    # built on first use inside a command: its progress bars would bury the command's own output
    with quiet_progress_bars():
        _save_tiny_base(directory, layout)


def _save_tiny_base(directory: Path, layout: str) -> None:
    if layout in QWEN_VL_LAYOUTS:  # trained from the whole checkpoint (model.checkpoint)
        model, processor = tiny_qwen_vl(layout)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        return
    save_llava_with_parts(*tiny_llava(layout), directory)


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


def resolve_tiny_path(value: str) -> Path:
    """``tiny:<relative path>`` -> the asset in the pmod cache, built on first use."""
    relative = value[len(TINY_PREFIX) :].strip("/")
    root = tiny_root()
    head = relative.split("/", 1)[0]
    if head in TINY_BASES:
        build_tiny_base(layout=TINY_BASES[head])
    elif head == "shapes":
        synthetic.ensure_synthetic(root / "shapes")
    elif head == "media":
        media.ensure_media(root / "media")
    elif head == "grid":
        from .grid import ensure_grid

        ensure_grid(root / "grid")
    elif head == "grid_base":
        from .grid import base_is_current

        build_once(root / "grid_base", is_complete=base_is_current, build=_quiet_grid_base)
    else:
        known = ", ".join(f"tiny:{name}" for name in TINY_BASES)
        raise UserError(
            f"unknown tiny asset {value!r}; known: {known}, tiny:shapes/<file>, tiny:media/<file>, "
            "tiny:grid_base, tiny:grid/<file>"
        )
    return root / relative


def _quiet_grid_base(directory: Path) -> None:
    from ..model.loading import quiet_progress_bars
    from .grid import grid_base

    with quiet_progress_bars():  # built on first use inside a command (see _write_tiny_base)
        grid_base(directory)


def is_tiny_path(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(TINY_PREFIX)


def resolve_name(value: str | Path) -> str:
    """A model, data or folder name as recipes and flags give it: ``tiny:...`` becomes the
    cached asset's path (built on first use); anything else (a path, a Hub id) stays as given."""
    value = str(value)  # flags may arrive as Path objects
    return str(resolve_tiny_path(value)) if is_tiny_path(value) else value


def default_image_folder(data_path: str | Path) -> Path:
    """The folder a data file's image paths are relative to when none is given: the file's own,
    except for the tiny sets (``tiny:shapes/*.json``, ``tiny:grid/*.json``), whose images are in
    their ``images`` folder."""
    data_path = Path(data_path)
    for name in ("shapes", "grid"):
        folder = tiny_root() / name
        if data_path.parent == folder or data_path.parent.resolve() == folder.resolve():
            return folder / "images"
    return data_path.parent
