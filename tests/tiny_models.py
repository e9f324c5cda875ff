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
    Qwen2Config,
    SiglipVisionConfig,
)

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
):
    """A random-weight LLaVA (``layout='llava'``), LLaVA-NeXT (``'next'``) or LLaVA-OneVision
    (``'onevision'``) model and its processor."""
    if layout == "onevision":
        return tiny_onevision(text_model, layers, attn, seed)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
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
