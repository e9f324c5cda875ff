"""Tiny checkpoints in the original LLaVA and the official p-MoD formats, written as those
projects write theirs: a transformers-4.x-style config.json with the ``mm_*`` / ``mod_*`` keys,
weights under the original names (``model.layers.{i}.decoder_layer.*`` and
``model.layers.{i}.router.router.*`` for MoD layers, ``model.mm_projector.{0,2}.*``,
``model.image_newline``, ``model.vision_tower.vision_tower.vision_model.*``), sharded ``.bin`` or
``.safetensors`` with an index, a tokenizer without ``<image>``, and the vision tower as a separate
full CLIP model directory named by ``mm_vision_tower``. Random weights, seconds on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TOWER_HIDDEN = 32
IMAGE = 56  # px: 4x4 = 16 patches of 14 px
PATCH = 14
HIDDEN = 64
# (width, height) as the original configs write them
PINPOINTS_WH = [[112, 56], [56, 112], [112, 112]]
TEXT_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
MODEL_TYPES = {
    "llama": ("llava_llama", "LlavaLlamaForCausalLM"),
    "mistral": ("llava_mistral", "LlavaMistralForCausalLM"),
    "qwen2": ("llava_qwen", "LlavaQwenForCausalLM"),
}
_CORPUS = [
    "USER: what colour is the square? ASSISTANT: red",
    "A chat between a curious user and an artificial intelligence assistant.",
    "how many circles are there on the left side of the picture",
    "the quick brown fox jumps over the lazy dog 0123456789",
]


def save_clip_tower(directory: Path, seed: int = 0, image: int = IMAGE) -> Path:
    """A full CLIP model (text and vision, like openai/clip-vit-large-patch14-336) and its image
    processor, for ``image`` px square crops."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=TOWER_HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            image_size=image, patch_size=PATCH,
        ),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": image}, crop_size={"height": image, "width": image}
    ).save_pretrained(directory)
    return directory


def vicuna_like_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with <unk>, <s>, </s> (ids 0, 1, 2) and no pad or <image> token, adding <s>."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _write_bpe_tokenizer(path: Path) -> int:
    tokenizer = vicuna_like_tokenizer()
    tokenizer.save_pretrained(path)
    return len(tokenizer)


@dataclass
class OriginalCheckpoint:
    """What the test knows about a checkpoint it wrote: the tensors by their original names."""

    path: Path
    text_model: str
    layout: str  # "llava" | "llava_next"
    config: dict
    text_config: object  # the transformers config of the language model
    weights: dict[str, torch.Tensor]
    tower_path: Path
    routers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _text_config_values(text_model: str, layers: int, vocab: int, hidden: int = HIDDEN) -> dict:
    """The language model's part of config.json as transformers 4.3x wrote it."""
    values = {
        "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "vocab_size": vocab, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.02,
    }  # fmt: skip
    if text_model == "llama":
        values.update(pretraining_tp=1, attention_bias=False)
    elif text_model == "mistral":
        values.update(sliding_window=None)
    else:
        values.update(use_sliding_window=False, sliding_window=512, max_window_layers=layers)
    return values


def _multimodal_values(layout: str, tower: Path, unfreeze_tower: bool) -> dict:
    values = {
        "mm_vision_tower": str(tower), "mm_hidden_size": TOWER_HIDDEN, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_projector_lr": None, "use_mm_proj": True,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": unfreeze_tower,
    }  # fmt: skip
    if layout == "llava_next":
        values.update(
            image_aspect_ratio="anyres",
            mm_patch_merge_type="spatial_unpad",
            image_grid_pinpoints=PINPOINTS_WH,
        )
    else:
        values.update(image_aspect_ratio="pad", mm_patch_merge_type="flat")
    return values


def write_original_checkpoint(
    path: Path,
    tower: Path,
    text_model: str = "llama",
    layout: str = "llava",
    layers: int = 4,
    shards: int = 2,
    file_format: str = "bin",
    unfreeze_tower: bool = False,
    pmod: dict | None = None,
    mod_layers: tuple[int, ...] = (),
    seed: int = 0,
    hidden: int = HIDDEN,
    tokenizer_writer=None,
    router_scale: float = 2.0,
) -> OriginalCheckpoint:
    """An original LLaVA checkpoint (or, with ``pmod`` config keys and ``mod_layers``, an official
    p-MoD one) in ``path``. The checkpoint also stores a tower that differs from ``tower``: the
    original loader reads it only when the tower was fine-tuned (``unfreeze_tower``).
    ``tokenizer_writer(path) -> vocab size`` writes the tokenizer files (default: a byte-level BPE
    saved by transformers); routers are drawn with standard deviation ``router_scale``."""
    torch.manual_seed(seed)
    path.mkdir(parents=True)
    vocab = (tokenizer_writer or _write_bpe_tokenizer)(path)
    text_values = _text_config_values(text_model, layers, vocab, hidden)
    config_class, model_class = TEXT_CLASSES[text_model]
    # (transformers 5 reads rope_theta alone and warns about an explicit rope_scaling)
    text_config = config_class(**{k: v for k, v in text_values.items() if k != "rope_scaling"})
    weights = {
        name: tensor.clone() for name, tensor in model_class(text_config).state_dict().items()
    }
    weights["model.mm_projector.0.weight"] = torch.randn(hidden, TOWER_HIDDEN) * 0.2
    weights["model.mm_projector.0.bias"] = torch.randn(hidden) * 0.1
    weights["model.mm_projector.2.weight"] = torch.randn(hidden, hidden) * (0.2 * 8 / hidden**0.5)
    weights["model.mm_projector.2.bias"] = torch.randn(hidden) * 0.1
    if layout == "llava_next":
        weights["model.image_newline"] = torch.randn(hidden)
    for name, tensor in CLIPModel.from_pretrained(tower).vision_model.state_dict().items():
        # a fine-tuned copy of the tower, as LLaVA saves it inside the model
        weights[f"model.vision_tower.vision_tower.vision_model.{name}"] = (
            tensor + 0.05 * torch.randn_like(tensor)
        )
    routers = {}
    for index in mod_layers:
        prefix = f"model.layers.{index}."
        for name in [n for n in weights if n.startswith(prefix)]:
            weights[prefix + "decoder_layer." + name.removeprefix(prefix)] = weights.pop(name)
        routers[index] = (torch.randn(1, hidden) * router_scale, torch.randn(1))
        weights[prefix + "router.router.weight"], weights[prefix + "router.router.bias"] = routers[
            index
        ]
    model_type, architecture = MODEL_TYPES[text_model]
    if pmod is not None:
        model_type, architecture = "pmod_llava_llama", "PmodLlavaLlamaForCausalLM"
    config = {
        "architectures": [architecture], "model_type": model_type, "transformers_version": "4.37.2",
        **text_values, **_multimodal_values(layout, tower, unfreeze_tower), **(pmod or {}),
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_weights(path, weights, shards, file_format)
    return OriginalCheckpoint(
        path, text_model, layout, config, text_config, weights, tower, routers
    )


def save_weights(
    path: Path, weights: dict[str, torch.Tensor], shards: int, file_format: str
) -> list[Path]:
    """``weights`` in ``shards`` files (with an index when more than one), as save_pretrained did."""
    names = sorted(weights)
    groups = [names[i::shards] for i in range(shards)]
    single = "pytorch_model.bin" if file_format == "bin" else "model.safetensors"
    files, weight_map = [], {}
    for number, group in enumerate(groups, start=1):
        stem, suffix = single.rsplit(".", 1)
        file = path / (single if shards == 1 else f"{stem}-{number:05d}-of-{shards:05d}.{suffix}")
        tensors = {name: weights[name].contiguous().clone() for name in group}
        if file_format == "bin":
            torch.save(tensors, file)
        else:
            save_file(tensors, str(file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update(dict.fromkeys(group, file.name))
    if shards > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
            "weight_map": weight_map,
        }
        (path / f"{single}.index.json").write_text(json.dumps(index, indent=2))
    return files


OFFICIAL_SETTINGS = {
    "mod_target_token_type": "vision_all",
    "mod_weight_norm": "tanh_0.2_1",
    "mod_bias_enabled": True,
    "mod_special_init": True,
}
