"""Original LLaVA and official p-MoD checkpoints in: `pmod convert`, the loader, `pmod eval`.

The checkpoints are written by ``foreign_checkpoints`` in those projects' own format. An original
LLaVA checkpoint is checked against a forward pass of the original layout written here (the -200
placeholder spliced with the image features, CLIP layer -2 without CLS, mlp2x_gelu, and for
anyres the base crop, the grid, unpadding and the newline column as the original code builds
them); an official p-MoD checkpoint against the llava-hf model built here from the same tensors
and converted by ``apply_pmod`` with the released code's options.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from foreign_checkpoints import (
    OFFICIAL_SETTINGS,
    PINPOINTS_WH,
    TEXT_CLASSES,
    save_clip_tower,
    write_original_checkpoint,
)
from tiny_models import random_image
from transformers import (
    CLIPModel,
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from typer.testing import CliRunner

from pmod_cli import PMoDConfig, apply_pmod, record_routing
from pmod_cli.cli import app, main
from pmod_cli.model import kv_cache_lengths
from pmod_cli.model.loading import load_checkpoint

IMAGE_TOKEN_INDEX = -200  # the original's placeholder id
PROMPT = "USER: <image>\nwhat colour is the square? ASSISTANT:"
IMAGES = [(60, 40), (40, 90)]  # (width, height): a 1x2 and a 2x1 anyres grid


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return save_clip_tower(tmp_path_factory.mktemp("tower") / "clip-vit-tiny")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["pmod", *args])
    capsys.readouterr()  # what building the checkpoint printed
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# ---- the original layout's forward, written from the original code's description -------------


def select_best_resolution(width: int, height: int, pinpoints_wh):
    """The (width, height) grid the original picks: most effective pixels, then least waste."""
    best, best_effective, best_waste = None, 0, float("inf")
    for grid_w, grid_h in pinpoints_wh:
        scale = min(grid_w / width, grid_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = grid_w * grid_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (grid_w, grid_h), effective, waste
    return best


def unpad(features, width: int, height: int):
    """(dim, h, w) features of a padded grid -> the rows / columns that cover the image."""
    current_h, current_w = features.shape[1:]
    if width / height > current_w / current_h:
        new_h = int(height * (current_w / width))
        pad = (current_h - new_h) // 2
        return features[:, pad : current_h - pad, :]
    new_w = int(width * (current_h / height))
    pad = (current_w - new_w) // 2
    return features[:, :, pad : current_w - pad]


def original_image_features(checkpoint, crops, width: int, height: int):
    """The features the original model splices in for one image: (tokens, hidden)."""
    weights = checkpoint.weights
    vision = CLIPModel.from_pretrained(checkpoint.tower_path).vision_model
    if checkpoint.config["unfreeze_mm_vision_tower"]:  # a fine-tuned tower is the checkpoint's
        prefix = "model.vision_tower.vision_tower.vision_model."
        vision.load_state_dict(
            {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        )
    patches = vision(crops, output_hidden_states=True).hidden_states[-2][:, 1:]  # (crops, 16, 32)
    hidden = F.gelu(
        patches @ weights["model.mm_projector.0.weight"].T + weights["model.mm_projector.0.bias"]
    )
    features = (
        hidden @ weights["model.mm_projector.2.weight"].T + weights["model.mm_projector.2.bias"]
    )
    if checkpoint.layout == "llava":
        return features[0]
    side = 4
    grid_w, grid_h = select_best_resolution(width, height, PINPOINTS_WH)
    rows, cols = grid_h // 56, grid_w // 56
    grid = (
        features[1:]
        .view(rows, cols, side, side, -1)
        .permute(4, 0, 2, 1, 3)
        .flatten(1, 2)
        .flatten(2, 3)
    )
    grid = unpad(grid, width, height)  # (dim, h, w)
    newline = weights["model.image_newline"][:, None, None].expand(-1, grid.shape[1], 1)
    high_res = (
        torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
    )  # (h * (w + 1), dim)
    return torch.cat([features[0], high_res], dim=0)


def original_logits(checkpoint, input_ids, image_features):
    """The language model on the text embeddings with the features spliced in at the -200 id."""
    text_model = TEXT_CLASSES[checkpoint.text_model][1](checkpoint.text_config).eval()
    text_weights = {
        k: v
        for k, v in checkpoint.weights.items()
        if not k.startswith(("model.mm_", "model.vision_", "model.image_"))
    }
    text_model.load_state_dict(text_weights)
    at = input_ids.index(IMAGE_TOKEN_INDEX)
    embed = text_model.get_input_embeddings()
    embeds = torch.cat(
        [
            embed(torch.tensor(input_ids[:at])),
            image_features,
            embed(torch.tensor(input_ids[at + 1 :])),
        ]
    )
    return text_model(inputs_embeds=embeds[None]).logits[0]


def with_placeholder(input_ids, image_token_id: int) -> list[int]:
    """llava-hf's prompt (one <image> per feature) as the original's: one -200 per image."""
    ids = input_ids.tolist()
    first = ids.index(image_token_id)
    last = len(ids) - ids[::-1].index(image_token_id)
    return ids[:first] + [IMAGE_TOKEN_INDEX] + ids[last:]


@pytest.mark.parametrize(
    "text_model, layout, file_format, shards, unfreeze_tower",
    [
        (
            "llama",
            "llava",
            "bin",
            2,
            False,
        ),  # LLaVA-1.5 (pad), frozen tower: the tower directory's weights
        ("llama", "llava_next", "safetensors", 1, True),  # LLaVA-1.6: anyres, fine-tuned tower
        ("qwen2", "llava_next", "safetensors", 3, False),
        ("mistral", "llava", "bin", 1, False),
    ],
)
def test_original_llava_converts_to_llava_hf_with_the_original_logits(
    tmp_path, tower, monkeypatch, capsys, text_model, layout, file_format, shards, unfreeze_tower
):
    checkpoint = write_original_checkpoint(
        tmp_path / "original",
        tower,
        text_model,
        layout,
        shards=shards,
        file_format=file_format,
        unfreeze_tower=unfreeze_tower,
    )
    code, out, err = run_cli(
        monkeypatch, capsys, "convert", str(checkpoint.path), str(tmp_path / "hf"), "--dense"
    )
    assert code == 0, err
    assert f"a dense {layout} checkpoint, 4 layers" in out
    model, processor = load_checkpoint(tmp_path / "hf")  # through AutoModelForImageTextToText
    assert model.config.model_type == layout
    vocab = checkpoint.config["vocab_size"]
    image_token_id = model.config.image_token_id
    assert image_token_id == vocab  # <image> was added after the original vocabulary
    assert (
        model.config.text_config.vocab_size % 64 == 0
        and model.config.text_config.vocab_size > vocab
    )
    if layout == "llava_next":
        assert model.config.image_grid_pinpoints == [[h, w] for w, h in PINPOINTS_WH]
    for width, height in IMAGES if layout == "llava_next" else IMAGES[:1]:
        inputs = processor(
            images=[random_image(width, height, 3)], text=[PROMPT], return_tensors="pt"
        )
        with torch.no_grad():
            converted = model(**inputs).logits[0, :, :vocab]
            # LLaVA-NeXT: (1, crops, 3, 56, 56) for one image, the base crop first
            crops = inputs["pixel_values"][0] if layout == "llava_next" else inputs["pixel_values"]
            features = original_image_features(checkpoint, crops, width, height)
            reference = original_logits(
                checkpoint, with_placeholder(inputs["input_ids"][0], image_token_id), features
            )
        assert converted.shape == reference.shape
        assert torch.allclose(converted, reference, atol=1e-5, rtol=1e-5), (
            (converted - reference).abs().max()
        )


# ---- official p-MoD --------------------------------------------------------------------------------

OFFICIAL_NEXT = {
    **OFFICIAL_SETTINGS,
    "mod_target_layers": "shiftedcos_decay_0.85_0.15",
    "mod_router_factor": 0.36,
}
NEXT_MOD_LAYERS = (2, 3, 4, 5, 6, 7)  # 0.5 cos(pi l / 31) + 0.36 <= 0.85 from layer 2 on


def llava_hf_way(checkpoint, vocab_size: int, image_token_id: int):
    """The same tensors put into an HF LlavaNext model by hand, then ``apply_pmod`` with the
    released code's options and the checkpoint's routers."""
    text_config = checkpoint.text_config
    text_config.vocab_size = vocab_size
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig.from_pretrained(checkpoint.tower_path),
        text_config=text_config,
        image_token_id=image_token_id,
        image_grid_pinpoints=[[h, w] for w, h in PINPOINTS_WH],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    weights = checkpoint.weights
    text = {}
    for name, tensor in weights.items():
        if name.startswith("model.layers.") and ".router." not in name:
            text[name.removeprefix("model.").replace(".decoder_layer.", ".")] = tensor
    text["embed_tokens.weight"] = weights["model.embed_tokens.weight"]
    text["norm.weight"] = weights["model.norm.weight"]
    vocab = weights["lm_head.weight"].shape[0]
    with torch.no_grad():
        for name, tensor in text.items():
            model.model.language_model.get_parameter(name)[: tensor.shape[0]] = tensor
        model.lm_head.weight[:vocab] = weights["lm_head.weight"]
        projector = model.model.multi_modal_projector
        for linear, index in ((projector.linear_1, 0), (projector.linear_2, 2)):
            linear.weight.copy_(weights[f"model.mm_projector.{index}.weight"])
            linear.bias.copy_(weights[f"model.mm_projector.{index}.bias"])
        model.model.image_newline.copy_(weights["model.image_newline"])
        model.model.vision_tower.load_state_dict(
            CLIPModel.from_pretrained(checkpoint.tower_path).vision_model.state_dict()
        )
    apply_pmod(model, PMoDConfig(schedule="cosine31", beta=0.36, selection="weight"))
    with torch.no_grad():
        for index, (weight, bias) in checkpoint.routers.items():
            model.model.language_model.layers[index].router.weight.copy_(weight)
            model.model.language_model.layers[index].router.bias.copy_(bias)
    return model


def test_official_pmod_converts_to_what_the_core_computes_on_the_same_weights(
    tmp_path, tower, monkeypatch, capsys
):
    checkpoint = write_original_checkpoint(
        tmp_path / "p-MoD-LLaVA-NeXT", tower, "llama", "llava_next", layers=8, shards=3,
        pmod=OFFICIAL_NEXT, mod_layers=NEXT_MOD_LAYERS,
    )  # fmt: skip
    code, out, err = run_cli(
        monkeypatch, capsys, "convert", str(checkpoint.path), str(tmp_path / "pmod")
    )
    assert code == 0, err
    assert "6 of 8 layers are MoD" in out
    converted, processor = load_checkpoint(tmp_path / "pmod")
    assert converted.config.model_type == "pmod_llava_next"
    pmod = converted.pmod_config
    assert (pmod.schedule, pmod.beta, pmod.selection, pmod.weight_norm, pmod.alpha) == (
        "cosine31",
        0.36,
        "weight",
        "tanh",
        0.2,
    )
    reference = llava_hf_way(
        checkpoint, converted.config.text_config.vocab_size, converted.config.image_token_id
    )
    assert converted.retention_ratios == reference.retention_ratios
    vocab = checkpoint.config["vocab_size"]
    images = [random_image(width, height, 5) for width, height in IMAGES]
    inputs = processor(images=images, text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    results = []
    for model in (converted, reference):
        with torch.no_grad(), record_routing(model) as routing:
            output = model(**inputs, use_cache=True)
        results.append(
            (output.logits[..., :vocab], routing.layers, kv_cache_lengths(output.past_key_values))
        )
    (logits, kept, cache), (ref_logits, ref_kept, ref_cache) = results
    assert torch.equal(logits, ref_logits)
    assert sorted(kept) == list(NEXT_MOD_LAYERS)
    for index in NEXT_MOD_LAYERS:
        assert torch.equal(kept[index].keep_mask, ref_kept[index].keep_mask)
        vision = kept[index].vision_mask.sum(dim=1)
        assert (
            kept[index].kept_vision
            <= torch.floor(vision * converted.retention_ratios[index] + 1e-9)
        ).all()
    assert cache == ref_cache
    assert cache[7] != cache[0]  # skipped tokens are not cached


@pytest.mark.slow
def test_a_pmod_model_loaded_from_an_official_checkpoint_runs_pmod_eval(tmp_path, tower):
    checkpoint = write_original_checkpoint(
        tmp_path / "p-MoD-LLaVA-1.5", tower, "llama", "llava", layers=4, shards=2,
        pmod={**OFFICIAL_SETTINGS, "mod_target_layers": "interleave", "mod_router_factor": 0.5}, mod_layers=(1, 3),
    )  # fmt: skip
    output = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        ["eval", str(checkpoint.path), "--tasks", "pmod_tiny_vqa", "--limit", "2", "--batch-size", "2",
         "--output", str(output), "--device", "cpu"],
        terminal_width=200,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())
    (evaluated,) = report["checkpoints"]
    assert evaluated["retention_ratios"] == [1.0, 0.5, 1.0, 0.5]
    assert len(evaluated["answers"]["pmod_tiny_vqa"]) == 2
    assert evaluated["efficiency"]["kv_cache_vs_dense"] < 1.0
    assert all(m["vision_tokens"] == 16 for m in evaluated["measurements"])


# ---- bad input -------------------------------------------------------------------------------------


def _no_known_format(tmp_path, tower):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return "in no format pmod reads"


def _missing_tower(tmp_path, tower):
    checkpoint = write_original_checkpoint(tmp_path / "src", tower, shards=1)
    config = {**checkpoint.config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    (checkpoint.path / "config.json").write_text(json.dumps(config))
    return "is not a local directory: download it"


def _unknown_mod_target_layers(tmp_path, tower):
    settings = {
        **OFFICIAL_SETTINGS,
        "mod_target_layers": "shiftedexp_decay_0.85_0.15",
        "mod_router_factor": 0.5,
    }
    write_original_checkpoint(tmp_path / "src", tower, pmod=settings, mod_layers=(1,), shards=1)
    return "unknown mod_target_layers 'shiftedexp_decay_0.85_0.15'"


def _truncated_shard(tmp_path, tower):
    write_original_checkpoint(tmp_path / "src", tower, shards=2, file_format="safetensors")
    shard = tmp_path / "src" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return "model-00002-of-00002.safetensors"


def _truncated_bin_shard(tmp_path, tower):
    write_original_checkpoint(tmp_path / "src", tower, shards=2, file_format="bin")
    shard = tmp_path / "src" / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-300])
    return "pytorch_model-00001-of-00002.bin"


@pytest.mark.parametrize(
    "make",
    [
        _no_known_format,
        _missing_tower,
        _unknown_mod_target_layers,
        _truncated_shard,
        _truncated_bin_shard,
    ],
)
def test_bad_checkpoints_end_in_one_error_line_and_write_nothing(
    tmp_path, tower, monkeypatch, capsys, make
):
    message = make(tmp_path, tower)
    code, out, err = run_cli(
        monkeypatch, capsys, "convert", str(tmp_path / "src"), str(tmp_path / "out")
    )
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_loader_points_at_convert_when_the_tower_is_a_hub_id(tmp_path, tower):
    checkpoint = write_original_checkpoint(tmp_path / "src", tower, shards=1)
    (checkpoint.path / "config.json").write_text(
        json.dumps({**checkpoint.config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"})
    )
    from pmod_cli.errors import UserError

    with pytest.raises(UserError, match="pmod convert with --vision-tower DIR"):
        load_checkpoint(checkpoint.path)
    model, _ = load_checkpoint(checkpoint.path, vision_tower=tower)  # given the tower, it loads
    assert model.config.model_type == "llava"
