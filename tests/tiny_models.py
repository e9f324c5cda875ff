"""Tiny LLaVA / LLaVA-NeXT / LLaVA-OneVision / Qwen-VL models and processors: no download, seconds
on a CPU. Each family builds its own (``ModelFamily.tiny``, the builder the tiny default and the
benchmarks use too); these are the tests' tokenizers and numbers."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pmod_cli.data.tiny_build import QWEN_VL_SPECIAL_TOKENS
from pmod_cli.model.families import get_family
from pmod_cli.model.families.qwen_vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from pmod_cli.model.families.tiny import TinySpec

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
PATCH = 14
BASE_IMAGE = 56  # 4x4 = 16 vision tokens per crop
GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
# OneVision: 4x4 features per crop; a 4x4 grid (16 x 16 features) exceeds anyres_max_9 and is shrunk
OV_GRID_PINPOINTS = [
    [56, 56],
    [56, 112],
    [112, 56],
    [112, 112],
    [112, 168],
    [168, 112],
    [168, 168],
    [224, 224],
]

_CORPUS = [
    "USER: what colour is the square? ASSISTANT: red",
    "describe the image in one word please",
    "how many circles are there on the left side of the picture",
    "the quick brown fox jumps over the lazy dog 0123456789",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.image_token = IMAGE_TOKEN
    return fast


def tiny_model(
    text_model: str = "llama",
    layout: str = "llava",
    layers: int = 4,
    attn: str = "sdpa",
    seed: int = 0,
    tokenizer=None,
):
    """A random-weight LLaVA (``layout='llava'``), LLaVA-NeXT (``'next'``), LLaVA-OneVision
    (``'onevision'``), Qwen2.5-VL (``'qwen2_5_vl'``) or Qwen3-VL (``'qwen3_vl'``) model and its
    processor. LLaVA and LLaVA-NeXT take another ``tokenizer`` (with ``<image>`` and a pad token)."""
    if layout == "onevision":
        return tiny_onevision(text_model, layers, attn, seed)
    if layout in ("qwen2_5_vl", "qwen3_vl"):  # their own language models
        return tiny_qwen_vl(layout, layers, attn, seed)
    # LLaVA-1.5 with the CLIP tower's own image processor (no pad), as llava-hf ships it
    spec = TinySpec(
        text_model=text_model,
        layers=layers,
        grid_pinpoints=tuple(map(tuple, GRID_PINPOINTS)),
        seed=seed,
        attn=attn,
    )
    family = get_family("llava" if layout == "llava" else "llava_next")
    return family.tiny(tokenizer or tiny_tokenizer(), spec)


def tiny_onevision(text_model: str = "qwen2", layers: int = 4, attn: str = "sdpa", seed: int = 0):
    """A random-weight LLaVA-OneVision (SigLIP-style tower, 56 px crops) and its processor, with
    image and video processors and ``<image>`` / ``<video>`` tokens."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    tokenizer.video_token = VIDEO_TOKEN
    spec = TinySpec(
        text_model=text_model,
        layers=layers,
        feature_layer=-1,
        grid_pinpoints=tuple(map(tuple, OV_GRID_PINPOINTS)),
        seed=seed,
        attn=attn,
    )
    return get_family("llava_onevision").tiny(tokenizer, spec)


# Qwen-VL: 14 px patches (Qwen3-VL: 16 px) merged 2x2; images between 2 and 16 merged tokens, so
# images of different sizes give different token counts; a video step (2 frames) of 2 to 6 tokens
QWEN_VL_SPECIAL = ("<|endoftext|>", *QWEN_VL_SPECIAL_TOKENS)
QWEN_IMAGE, QWEN_VIDEO = IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER  # what a prompt holds for each


def tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the Qwen-VL special tokens (ids 0-6)."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(QWEN_VL_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_VL_SPECIAL[1:])})
    return fast


def tiny_qwen_vl(family: str = "qwen2_5_vl", layers: int = 4, attn: str = "sdpa", seed: int = 0):
    """A random-weight Qwen2.5-VL (``family='qwen2_5_vl'``) or Qwen3-VL (``'qwen3_vl'``, with
    DeepStack features added after layers 0 and 1) and its processor: images of 2 to 16 merged
    tokens, a video step of 2 to 6."""
    spec = TinySpec(layers=layers, max_positions=2048, generation_ids=True, seed=seed, attn=attn)
    return get_family(family).tiny(tiny_qwen_tokenizer(), spec)


def random_video(frames: int, width: int, height: int, seed: int) -> np.ndarray:
    """(frames, height, width, 3) uint8 frames, as a video decoder returns them."""
    return np.random.default_rng(seed).integers(
        0, 256, size=(frames, height, width, 3), dtype=np.uint8
    )


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def randomize_routers(model, std: float = 0.5, seed: int = 1) -> None:
    """Give routers non-zero weights so that selection depends on the tokens."""
    generator = torch.Generator().manual_seed(seed)
    text_model = model.model.language_model
    routers = [getattr(layer, "router", None) for layer in text_model.layers]
    routers.append(getattr(text_model, "pmod_shared_router", None))
    with torch.no_grad():
        for router in routers:
            if router is not None:
                router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * std)
                router.bias.copy_(torch.randn(router.bias.shape, generator=generator) * std)


def save_checkpoint(model, processor, directory):
    """Model and processor saved as one checkpoint directory (what a user's checkpoint holds)."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
