"""Tiny LLaVA / LLaVA-NeXT / LLaVA-OneVision models and processors built from configs: no download,
seconds on a CPU."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipVisionConfig,
)

from pmod_cli.data.tiny import QWEN_VL_SPECIAL_TOKENS
from pmod_cli.model.families.qwen_vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

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


def _text_config(text_model: str, vocab_size: int, pad_token_id: int, layers: int):
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        pad_token_id=pad_token_id,
    )
    if text_model == "llama":
        return LlamaConfig(**common)
    if text_model == "qwen2":
        return Qwen2Config(**common)
    if text_model == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(text_model)


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
    torch.manual_seed(seed)
    tokenizer = tokenizer or tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=BASE_IMAGE,
        patch_size=PATCH,
        projection_dim=32,
    )
    text = _text_config(text_model, len(tokenizer), tokenizer.pad_token_id, layers)
    common = dict(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if layout == "llava":
        config = LlavaConfig(**common, image_seq_length=(BASE_IMAGE // PATCH) ** 2)
        model_class = LlavaForConditionalGeneration
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": BASE_IMAGE},
            crop_size={"height": BASE_IMAGE, "width": BASE_IMAGE},
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    else:
        config = LlavaNextConfig(
            **common,
            image_grid_pinpoints=GRID_PINPOINTS,
            image_seq_length=(BASE_IMAGE // PATCH) ** 2,
        )
        model_class = LlavaNextForConditionalGeneration
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": BASE_IMAGE},
            crop_size={"height": BASE_IMAGE, "width": BASE_IMAGE},
            image_grid_pinpoints=GRID_PINPOINTS,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    config.text_config._attn_implementation = attn
    model = model_class(config).eval()
    model.set_attn_implementation(attn)
    return model, processor


def tiny_onevision(text_model: str = "qwen2", layers: int = 4, attn: str = "sdpa", seed: int = 0):
    """A random-weight LLaVA-OneVision (SigLIP-style tower, 56 px crops) and its processor, with
    image and video processors and ``<image>`` / ``<video>`` tokens."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    tokenizer.video_token = VIDEO_TOKEN
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=BASE_IMAGE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    text = _text_config(text_model, len(tokenizer), tokenizer.pad_token_id, layers)
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=OV_GRID_PINPOINTS,
    )
    config.text_config._attn_implementation = attn
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    size = {"height": BASE_IMAGE, "width": BASE_IMAGE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=OV_GRID_PINPOINTS
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(BASE_IMAGE // PATCH) ** 2,
        vision_feature_select_strategy="full",
    )
    return model, processor


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
    DeepStack features added after layers 0 and 1) and its processor."""
    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_VL_SPECIAL}
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if family == "qwen2_5_vl":
        patch = 14
        # head_dim 16: 8 rotary frequencies split 2 temporal, 3 height, 3 width
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
        }
        vision.update(patch_size=patch, window_size=56, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
        video_processor_class = Qwen2VLVideoProcessor
    else:
        patch = 16
        text.update(head_dim=16)
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
        vision.update(patch_size=patch, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
        model_class, processor_class = Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        video_processor_class = Qwen3VLVideoProcessor
    config.text_config._attn_implementation = attn
    model = model_class(config).eval()
    model.set_attn_implementation(attn)
    factor = patch * 2
    pixels = dict(patch_size=patch, merge_size=2, temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": factor * factor * 2, "longest_edge": factor * factor * 16}, **pixels
    )
    # Qwen3-VL caps the pixels of all frames together, Qwen2.5-VL those of one frame
    frames = 1 if family == "qwen2_5_vl" else 4
    video_size = {
        "shortest_edge": factor * factor * 2,
        "longest_edge": factor * factor * 6 * frames,
    }
    video_processor = video_processor_class(size=video_size, **pixels)
    processor = processor_class(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer
    )
    return model, processor


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
