"""Tiny checkpoints laid out file for file as the published repositories are, for the tests of
``test_published_checkpoints``: random weights, the published file names and formats.

What each inventory holds (as these fixtures write it; the hub cannot be reached from here, so
the lists were written from the projects' saving code and what their model cards describe):

- LLaVA's trainer (``liuhaotian/llava-v1.5-7b``, the released p-MoD models): ``config.json``
  (transformers 4.3x, ``mm_*`` / ``mod_*`` keys), ``generation_config.json``,
  ``pytorch_model-0000N-of-0000M.bin`` with ``pytorch_model.bin.index.json`` (LLaVA-1.6:
  ``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``),
  ``special_tokens_map.json`` (pad = ``<unk>``), ``tokenizer.model`` (sentencepiece),
  ``tokenizer_config.json`` (``LlamaTokenizer``, ``legacy: false``, special tokens as
  ``AddedToken`` dicts) and ``trainer_state.json``; no ``tokenizer.json``.
- LLaVA's stage 1 (``liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5``):
  ``config.json``, ``mm_projector.bin`` (the projector only, in the half precision it trained in)
  and ``trainer_state.json``.
- llava-hf (``llava-hf/llava-1.5-7b-hf``, ``llava-v1.6-*-hf``, ``llava-onevision-*-hf``):
  ``config.json``, ``generation_config.json``, ``model-0000N-of-0000M.safetensors`` with
  ``model.safetensors.index.json``, ``preprocessor_config.json`` (the image processor),
  ``processor_config.json`` (the processor's own keys, flat), ``chat_template.json``,
  ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
  ``added_tokens.json``; Llama-based ones also ``tokenizer.model``, Qwen2-based ones
  ``vocab.json`` and ``merges.txt``.
- Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct``): ``config.json``, ``generation_config.json``,
  ``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``,
  ``preprocessor_config.json`` (``Qwen2VLImageProcessor`` with ``min_pixels`` / ``max_pixels``),
  ``chat_template.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
  ``merges.txt``; no ``processor_config.json``.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import sentencepiece
import torch

CORPUS = [
    "USER: what colour is the square? ASSISTANT: red",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "how many circles are there on the left side of the picture",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "describe the image in one word please",
]
LLAMA_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    """A sentencepiece BPE model trained the way Llama's was (byte fallback, digits split, no
    normalisation, a dummy prefix; <unk> <s> </s> at ids 0 1 2), written as ``tokenizer.model``."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return path / "tokenizer.model"


def _added_token(content: str, typed: bool = True) -> dict:
    """A special token as transformers 4.3x wrote it: with its type in tokenizer_config.json,
    without it in special_tokens_map.json."""
    token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False}
    token["single_word"] = False
    return {"__type": "AddedToken", **token} if typed else token


def write_llava_trainer_tokenizer(path: Path) -> int:
    """LLaVA's trainer's tokenizer files: a sentencepiece model alone (no tokenizer.json); the
    vocabulary size."""
    model = train_sentencepiece(path)
    config = {
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "legacy": False, "model_max_length": 2048, "pad_token": None, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        **{key: _added_token(token) for key, token in LLAMA_SPECIALS.items()},
    }  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {key: _added_token(token, typed=False) for key, token in LLAMA_SPECIALS.items()}
    specials["pad_token"] = "<unk>"
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return sentencepiece.SentencePieceProcessor(model_file=str(model)).get_piece_size()


def write_trainer_leftovers(path: Path) -> None:
    """The files a LLaVA training run leaves beside the weights."""
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    generation["transformers_version"] = "4.37.2"
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    state = {"epoch": 1.0, "global_step": 5, "log_history": [{"loss": 2.5, "step": 5}]}
    (path / "trainer_state.json").write_text(json.dumps(state, indent=2))


def sentencepiece_ids(model_file: Path, text: str) -> list[int]:
    """What the sentencepiece library itself makes of ``text``, with Llama's <s> first."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return [processor.bos_id(), *processor.encode(text)]


def write_stage1_projector(path: Path, weights: dict[str, torch.Tensor], hidden: int) -> Path:
    """LLaVA's stage-1 output: the projector alone in bf16, its config and trainer state."""
    path.mkdir(parents=True)
    torch.save(
        {name: t.to(torch.bfloat16) for name, t in weights.items()}, path / "mm_projector.bin"
    )
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": hidden, "mm_projector_type": "mlp2x_gelu", "tune_mm_mlp_adapter": True,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_trainer_leftovers(path)
    (path / "generation_config.json").unlink()  # stage 1 saves only the projector
    return path


# ---- llava-hf and Qwen: what transformers 4.4x saved, the processor in its separate files ------

PROCESSOR_KEYS = {
    "llava": ["image_token", "num_additional_image_tokens", "patch_size", "vision_feature_select_strategy"],
    "llava_next": ["image_token", "num_additional_image_tokens", "patch_size", "vision_feature_select_strategy"],
    "llava_onevision": ["image_token", "video_token", "num_image_tokens", "vision_feature_select_strategy"],
}  # fmt: skip


def write_hf_published(path: Path, model, processor, family: str, shards: int = 3) -> Path:
    """``model`` and ``processor`` as a llava-hf or Qwen repository publishes them: sharded
    safetensors with an index, and the processor as separate files (preprocessor_config.json,
    processor_config.json for llava-hf, chat_template.json, the tokenizer's files)."""
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(path, max_shard_size=total // shards + 1)
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 2, "not sharded"
    processor.image_processor.save_pretrained(path)  # preprocessor_config.json
    if getattr(processor, "video_processor", None) is not None and family != "qwen2_5_vl":
        processor.video_processor.save_pretrained(path)
    _write_tokenizer_4x(path, processor.tokenizer)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    template = {"chat_template": processor.chat_template}
    (path / "chat_template.json").write_text(json.dumps(template, indent=2))
    if family in PROCESSOR_KEYS:
        values = {key: getattr(processor, key) for key in PROCESSOR_KEYS[family]}
        values["processor_class"] = type(processor).__name__
        (path / "processor_config.json").write_text(json.dumps(values, indent=2))
    return path


def _write_tokenizer_4x(path: Path, tokenizer) -> None:
    """The tokenizer's files with transformers 4.x's special_tokens_map.json and added_tokens.json."""
    tokenizer.save_pretrained(path)
    specials = {key: value for key, value in tokenizer.special_tokens_map.items() if value}
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    base = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    added = {token: index for token, index in tokenizer.get_added_vocab().items() if index >= base}
    (path / "added_tokens.json").write_text(json.dumps(added, indent=2))


def add_sentencepiece_files(path: Path, source: Path) -> None:
    """A Llama-based llava-hf repository also carries the sentencepiece model."""
    shutil.copy(source / "tokenizer.model", path / "tokenizer.model")


def write_qwen_vocab_files(path: Path, processor) -> None:
    """Qwen's vocab.json and merges.txt beside tokenizer.json, and its tokenizer class."""
    processor.tokenizer.backend_tokenizer.model.save(str(path))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(tokenizer_class="Qwen2Tokenizer", errors="replace", split_special_tokens=False)
    config_file.write_text(json.dumps(config, indent=2))


def set_pixel_limits(path: Path, min_pixels: int, max_pixels: int) -> None:
    """Qwen2.5-VL's preprocessor_config.json spells its limits ``min_pixels`` / ``max_pixels``."""
    config_file = path / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config.pop("size", None)
    config.update(min_pixels=min_pixels, max_pixels=max_pixels)
    config.update(
        image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor"
    )
    config_file.write_text(json.dumps(config, indent=2))
