"""Checkpoints exactly as they are published (``published_checkpoints`` lists each inventory):
``pmod convert``, then ``pmod eval``, ``pmod visualize`` and ``pmod chat`` on what it wrote, with
the converted tokenizer giving the ids the published tokenizer gives on its own; and a released
p-MoD checkpoint keeping, after conversion, the tokens the released code's rule keeps at a shape
where that rule and the paper's disagree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from foreign_checkpoints import OFFICIAL_SETTINGS, save_clip_tower, write_original_checkpoint
from published_checkpoints import (
    CORPUS,
    add_sentencepiece_files,
    sentencepiece_ids,
    set_pixel_limits,
    write_hf_published,
    write_llava_trainer_tokenizer,
    write_qwen_vocab_files,
    write_stage1_projector,
    write_trainer_leftovers,
)
from test_import_formats import run_cli
from tiny_models import IMAGE_TOKEN, random_image, tiny_model
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from pmod_cli import PMoDConfig, record_routing
from pmod_cli.model.loading import load_checkpoint
from pmod_cli.runtime import sentencepiece_problem
from pmod_cli.training.build import load_connector

# published checkpoints converted and run through every tool, end to end
pytestmark = pytest.mark.slow

PROMPTS = [*CORPUS[:3], "USER: what colour is the square?\nASSISTANT: red 42", "Hello, world!"]
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def chatml_template(image: str, video: str) -> str:
    """A ChatML chat template (Qwen's, OneVision's) that writes ``image`` / ``video`` per item."""
    item = (
        f"{{% if item['type'] == 'image' %}}{image}{{% elif item['type'] == 'video' %}}{video}"
        "{% else %}{{ item['text'] }}{% endif %}"
    )
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        f"{{% else %}}{{% for item in message['content'] %}}{item}{{% endfor %}}{{% endif %}}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


QWEN_TEMPLATE = chatml_template(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
)
ONEVISION_TEMPLATE = chatml_template("<image>\n", "<video>\n")
TRAINER_FILES = {
    "config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.model",
    "tokenizer_config.json", "trainer_state.json",
}  # fmt: skip
HF_FILES = {
    "added_tokens.json", "chat_template.json", "config.json", "generation_config.json",
    "model.safetensors.index.json", "preprocessor_config.json", "special_tokens_map.json",
    "tokenizer.json", "tokenizer_config.json",
}  # fmt: skip


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return save_clip_tower(tmp_path_factory.mktemp("tower") / "clip-vit-tiny")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "picture.png"
    random_image(60, 40, 3).save(path)
    return path


def weight_files(file_format: str, shards: int) -> set[str]:
    stem, suffix = ("pytorch_model", "bin") if file_format == "bin" else ("model", "safetensors")
    return {f"{stem}-{n:05d}-of-{shards:05d}.{suffix}" for n in range(1, shards + 1)} | {
        f"{stem}.{suffix}.index.json"
    }


def run_tools(monkeypatch, capsys, checkpoint: Path, image: Path, tmp_path: Path) -> None:
    """``pmod eval``, ``pmod visualize`` and ``pmod chat`` on a converted checkpoint."""
    report = tmp_path / "eval.json"
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", str(checkpoint), "--tasks", "pmod_tiny_vqa", "--limit", "2",
        "--batch-size", "2", "--output", str(report), "--device", "cpu",
    )  # fmt: skip
    assert code in (0, None), err
    (evaluated,) = json.loads(report.read_text())["checkpoints"]
    assert len(evaluated["answers"]["pmod_tiny_vqa"]) == 2
    assert evaluated["efficiency"]["kv_cache_vs_dense"] < 1.0
    figure = tmp_path / "kept.png"
    code, out, err = run_cli(
        monkeypatch, capsys, "visualize", str(image), "--checkpoint", str(checkpoint),
        "--layers", "1,3", "--output", str(figure),
    )  # fmt: skip
    assert code in (0, None), err
    assert figure.stat().st_size > 0
    code, out, err = run_cli(
        monkeypatch, capsys, "chat", str(checkpoint), "--image", str(image),
        "what colour is the square?", "--max-new-tokens", "3",
    )  # fmt: skip
    assert code in (0, None), err
    assert err.strip().splitlines()[-1].startswith("p-MoD: ")


def convert(monkeypatch, capsys, source: Path, target: Path) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "convert", str(source), str(target))
    assert code in (0, None), err
    assert "__type" not in out + err  # LLaVA's AddedToken dicts are read, not echoed


# ---- LLaVA's trainer: a sentencepiece model is the whole tokenizer ----------------------------

RELEASED_NEXT = {
    **OFFICIAL_SETTINGS,
    "mod_target_layers": "shiftedcos_decay_0.85_0.15",
    "mod_router_factor": 0.36,
}
TRAINER_CASES = {
    # liuhaotian/llava-v1.5-7b: pickled shards
    "llava-v1.5-7b": dict(layout="llava", file_format="bin", shards=2),
    # liuhaotian/llava-v1.6-vicuna-7b: safetensors shards
    "llava-v1.6-vicuna-7b": dict(layout="llava_next", file_format="safetensors", shards=3),
    # MCG-NJU/p-MoD-LLaVA-NeXT-7B: pickled shards, MoD layers' weights under decoder_layer
    "p-MoD-LLaVA-NeXT-7B": dict(
        layout="llava_next",
        file_format="bin",
        shards=3,
        layers=8,
        pmod=RELEASED_NEXT,
        mod_layers=(2, 3, 4, 5, 6, 7),
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(TRAINER_CASES))
def test_a_llava_trainer_checkpoint_converts_and_runs_every_tool(
    tmp_path, tower, image, monkeypatch, capsys, name
):
    options = TRAINER_CASES[name]
    checkpoint = write_original_checkpoint(
        tmp_path / name, tower, "llama", tokenizer_writer=write_llava_trainer_tokenizer, **options
    )
    write_trainer_leftovers(checkpoint.path)
    expected = TRAINER_FILES | weight_files(options["file_format"], options["shards"])
    assert set(os.listdir(checkpoint.path)) == expected  # no tokenizer.json
    convert(monkeypatch, capsys, checkpoint.path, tmp_path / "pmod")
    model, processor = load_checkpoint(tmp_path / "pmod")
    tokenizer = processor.tokenizer
    for text in PROMPTS:
        assert tokenizer(text).input_ids == sentencepiece_ids(
            checkpoint.path / "tokenizer.model", text
        )
    vocab = checkpoint.config["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_id == vocab
    assert tokenizer.pad_token == "<unk>"  # LLaVA pads with <unk>
    run_tools(monkeypatch, capsys, tmp_path / "pmod", image, tmp_path)


def test_the_original_tokenizer_and_the_converted_one_agree_beyond_prompts(tmp_path):
    """Whatever transformers makes of a tokenizer.model alone, the converted copy makes too
    (transformers and sentencepiece differ only on text that starts with several spaces)."""
    source = tmp_path / "source"
    write_llava_trainer_tokenizer(source)
    original = AutoTokenizer.from_pretrained(source)
    original.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in [*PROMPTS, "  two  spaces\nand ünïcödé 12345", "</s> inside <unk>"]:
        assert saved(text).input_ids == original(text).input_ids


# ---- llava-hf and Qwen: sharded safetensors, the processor in separate files -----------------


def llava_hf_1_5(path: Path, sentencepiece_dir: Path) -> Path:
    """llava-hf/llava-1.5-7b-hf: a Llama tokenizer (tokenizer.json and tokenizer.model)."""
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.pad_token = tokenizer.unk_token
    model, processor = tiny_model("llama", "llava", tokenizer=tokenizer)
    processor.chat_template = LLAVA_TEMPLATE
    write_hf_published(path, model, processor, "llava")
    add_sentencepiece_files(path, sentencepiece_dir)
    return path


def qwen2_5_vl(path: Path) -> Path:
    """Qwen/Qwen2.5-VL-7B-Instruct: vocab.json / merges.txt, pixel limits as min/max_pixels."""
    model, processor = tiny_model("qwen2", "qwen2_5_vl")
    processor.chat_template = QWEN_TEMPLATE
    write_hf_published(path, model, processor, "qwen2_5_vl")
    write_qwen_vocab_files(path, processor)
    set_pixel_limits(path, 28 * 28 * 2, 28 * 28 * 12)
    return path


def llava_onevision_hf(path: Path) -> Path:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf: a Qwen2 tokenizer, image and video processors."""
    model, processor = tiny_model("qwen2", "onevision")
    processor.chat_template = ONEVISION_TEMPLATE
    write_hf_published(path, model, processor, "llava_onevision")
    write_qwen_vocab_files(path, processor)
    return path


HF_CASES = {
    "llava-1.5-7b-hf": {"processor_config.json", "tokenizer.model"},
    "Qwen2.5-VL-7B-Instruct": {"vocab.json", "merges.txt"},
    "llava-onevision-qwen2-7b-ov-hf": {
        "processor_config.json", "vocab.json", "merges.txt", "video_preprocessor_config.json",
    },
}  # fmt: skip


def write_hf_case(name: str, path: Path, tmp_path: Path) -> Path:
    if name == "llava-1.5-7b-hf":
        sentencepiece_dir = tmp_path / "sentencepiece"
        write_llava_trainer_tokenizer(sentencepiece_dir)
        return llava_hf_1_5(path, sentencepiece_dir)
    return qwen2_5_vl(path) if name.startswith("Qwen") else llava_onevision_hf(path)


@pytest.mark.parametrize("name", list(HF_CASES))
def test_an_hf_published_checkpoint_converts_and_runs_every_tool(
    tmp_path, image, monkeypatch, capsys, name
):
    source = write_hf_case(name, tmp_path / name, tmp_path)
    files = set(os.listdir(source))
    shards = {file for file in files if file.startswith("model-")}
    assert len(shards) >= 2 and files - shards == HF_FILES | HF_CASES[name]
    convert(monkeypatch, capsys, source, tmp_path / "pmod")
    _, processor = load_checkpoint(tmp_path / "pmod")
    published = Tokenizer.from_file(str(source / "tokenizer.json"))  # the tokenizers library alone
    for text in PROMPTS:
        assert processor.tokenizer(text).input_ids == published.encode(text).ids
    template = json.loads((source / "chat_template.json").read_text())["chat_template"]
    assert processor.chat_template == template
    if name.startswith("Qwen"):  # the published pixel limits, not the class defaults
        size = processor.image_processor.size
        assert (size["shortest_edge"], size["longest_edge"]) == (28 * 28 * 2, 28 * 28 * 12)
    run_tools(monkeypatch, capsys, tmp_path / "pmod", image, tmp_path)


def test_an_lmms_lab_onevision_checkpoint_is_refused_in_one_line(
    tmp_path, tower, monkeypatch, capsys
):
    """lmms-lab's own OneVision format (anyres_max_9) is not read: convert the llava-hf copy."""
    checkpoint = write_original_checkpoint(tmp_path / "ov", tower, "qwen2", shards=1)
    config = {**checkpoint.config, "image_aspect_ratio": "anyres_max_9"}
    config["mm_patch_merge_type"] = "spatial_unpad"
    (checkpoint.path / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli(
        monkeypatch, capsys, "convert", str(checkpoint.path), str(tmp_path / "out")
    )
    assert code == 2 and err.count("\n") == 1 and "'anyres_max_9'" in err, err
    assert not (tmp_path / "out").exists()


def test_llava_stage1_output_is_a_pretrained_connector(tmp_path):
    """liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5: config.json, trainer_state.json
    and mm_projector.bin, its tensors in bf16 as stage 1 trained them."""
    model, _ = tiny_model(layers=2)
    projector = model.model.multi_modal_projector
    saved = {
        f"model.mm_projector.{index}.{kind}": torch.randn_like(getattr(linear, kind))
        for index, linear in ((0, projector.linear_1), (2, projector.linear_2))
        for kind in ("weight", "bias")
    }
    path = write_stage1_projector(tmp_path / "pretrain", saved, hidden=64)
    assert set(os.listdir(path)) == {"config.json", "mm_projector.bin", "trainer_state.json"}
    assert load_connector(model, path)
    assert projector.linear_1.weight.dtype == torch.float32
    stored = saved["model.mm_projector.0.weight"].to(torch.bfloat16).float()
    assert torch.equal(projector.linear_1.weight, stored)


# ---- the released selection rule where it matters ----------------------------------------------

BIG_LAYERS, BIG_HIDDEN, BIG_IMAGE = 32, 512, 336  # 24 x 24 = 576 vision tokens


def mod_layer_inputs(model) -> tuple[dict[int, torch.Tensor], list]:
    """Hooks that keep the hidden states entering each decoder layer."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.model.language_model.layers):

        def keep(module, args, kwargs, index=index):
            seen[index] = (args[0] if args else kwargs["hidden_states"]).detach()

        handles.append(layer.register_forward_pre_hook(keep, with_kwargs=True))
    return seen, handles


def released_and_paper_keep(hidden, router, vision, ratio):
    """(kept by the released rule, kept by the raw-score rule): vision-token index sets of one
    sample, derived here from the layer's input and the checkpoint's router tensors."""
    weight, bias = router
    scores = F.linear(hidden, weight, bias)[:, 0]  # (seq,)
    count = int(torch.floor(vision.sum() * ratio + 1e-9))
    normalised = 1 + 0.2 * torch.tanh(scores.masked_fill(~vision, float("-inf")))
    released = set(torch.topk(normalised, count).indices.tolist()) & set(
        vision.nonzero()[:, 0].tolist()
    )
    paper = set(torch.topk(scores.masked_fill(~vision, float("-inf")), count).indices.tolist())
    return released, paper


def test_a_released_checkpoint_keeps_the_tokens_its_rule_keeps_where_the_rules_disagree(
    tmp_path, monkeypatch, capsys
):
    tower = save_clip_tower(tmp_path / "clip-336", image=BIG_IMAGE)
    mod_layers = tuple(
        index
        for index, ratio in enumerate(
            PMoDConfig(schedule="cosine31", beta=0.5).retention_ratios(32)
        )
        if ratio < 1
    )
    checkpoint = write_original_checkpoint(
        tmp_path / "p-MoD-LLaVA-v1.5-7B", tower, "llama", "llava", layers=BIG_LAYERS,
        hidden=BIG_HIDDEN, shards=2, router_scale=8.0, mod_layers=mod_layers,
        pmod={**OFFICIAL_SETTINGS, "mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_router_factor": 0.5},
    )  # fmt: skip
    convert(monkeypatch, capsys, checkpoint.path, tmp_path / "pmod")
    model, processor = load_checkpoint(tmp_path / "pmod")
    assert model.pmod_config.selection == "weight"
    inputs = processor(
        images=[random_image(BIG_IMAGE, BIG_IMAGE, 7)],
        text=["USER: <image>\nwhat colour is the square? ASSISTANT:"],
        return_tensors="pt",
    )
    vision = inputs["input_ids"][0] == model.config.image_token_id
    assert int(vision.sum()) == 576
    seen, handles = mod_layer_inputs(model)
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
    for handle in handles:
        handle.remove()
    disagree = []
    for index in mod_layers:
        released, paper = released_and_paper_keep(
            seen[index][0], checkpoint.routers[index], vision, model.retention_ratios[index]
        )
        kept = set(routing.layers[index].keep_mask[0].nonzero()[:, 0].tolist())
        assert kept & set(vision.nonzero()[:, 0].tolist()) == released, index
        disagree.append(released != paper)
    # the shape tells the rules apart: saturated weights tie (at 1.2, and at 0.8 with the text)
    middle_on = [d for index, d in zip(mod_layers, disagree, strict=True) if index >= 16]
    assert sum(middle_on) >= 0.75 * len(middle_on) and sum(disagree) >= 0.75 * len(disagree)


# ---- the environment: protobuf against sentencepiece's generated code -------------------------

PMOD = [sys.executable, "-m", "pmod_cli.cli"]
NEWER_GENCODE = """from google.protobuf import runtime_version as _runtime_version
_runtime_version.ValidateProtobufRuntimeVersion(
    _runtime_version.Domain.PUBLIC,
    99,
    0,
    0,
    '',
    'sentencepiece_model.proto'
)
"""


def test_the_default_install_reads_sentencepiece_models(monkeypatch, capsys):
    assert sentencepiece_problem() is None
    code, out, err = run_cli(monkeypatch, capsys, "--version")
    assert code in (0, None) and out.startswith("pmod ") and err == ""


def sentencepiece_built_for_a_newer_protobuf(root: Path) -> dict:
    """An environment whose sentencepiece was generated by a protobuf newer than the installed
    one (as sentencepiece 0.2.3 beside protobuf 6): its package and metadata first on the path."""
    package = root / "sentencepiece"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sentencepiece_model_pb2.py").write_text(NEWER_GENCODE)
    metadata = root / "sentencepiece-9.9.9.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sentencepiece\nVersion: 9.9.9\n"
    )
    return {**os.environ, "PYTHONPATH": str(root)}


def test_a_protobuf_older_than_sentencepiece_needs_is_named_with_its_fix(tmp_path, tower):
    environment = sentencepiece_built_for_a_newer_protobuf(tmp_path / "site")
    version = subprocess.run(
        [*PMOD, "--version"], capture_output=True, text=True, env=environment, timeout=300
    )
    assert version.returncode == 0 and version.stdout.startswith("pmod ")
    (warning,) = version.stderr.strip().splitlines()
    assert warning.startswith("warning: sentencepiece 9.9.9 needs protobuf 99.x >= 99.0.0")
    assert "fix: pip install 'sentencepiece>=0.2.1,<0.2.3'" in warning
    checkpoint = write_original_checkpoint(
        tmp_path / "llava", tower, shards=1, tokenizer_writer=write_llava_trainer_tokenizer
    )
    converted = subprocess.run(
        [*PMOD, "convert", str(checkpoint.path), str(tmp_path / "out")],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert converted.returncode == 2
    (line,) = converted.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot load the tokenizer of {checkpoint.path}: sentencepiece")
    assert "fix: pip install" in line and not (tmp_path / "out").exists()
