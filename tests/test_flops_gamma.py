"""`pmod flops` with the gamma-MoD options: text competing with the image (routed_tokens="all"),
shared routers, mod_layers lists, and threshold routing with ratios measured on calibration samples."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image
from test_flops import TINY_LLAVA, measure, tiny_prefill_inputs
from tiny_models import random_image, randomize_routers, tiny_model
from transformers import AutoModelForImageTextToText

from pmod_cli import PMoDConfig, apply_pmod, cli
from pmod_cli.data.prompts import build_prompt
from pmod_cli.data.tiny import resolve_tiny_path
from pmod_cli.efficiency.flops import DEFAULT_PREFIX_TEXT_TOKENS, count_flops, count_flops_for_model
from pmod_cli.errors import UserError
from pmod_cli.model import kv_cache_lengths, record_routing
from pmod_cli.model.presets import (
    ModelShape,
    TextShape,
    VisionShape,
    get_preset,
    read_model_shape,
    shape_from_hf_config,
)

# d 8, m 16, 2 heads of 4 (no GQA), vocabulary 10, two layers
SMALL = ModelShape(
    "small",
    "llava",
    TextShape(
        "llama",
        num_layers=2,
        hidden_size=8,
        intermediate_size=16,
        num_heads=2,
        num_kv_heads=2,
        vocab_size=10,
    ),
    VisionShape(
        "clip_vision_model",
        num_layers=1,
        hidden_size=8,
        intermediate_size=16,
        num_heads=2,
        image_size=28,
        patch_size=14,
    ),
    image_token_id=9,
)


def run_pmod(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pmod", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ---- the formula by hand ----------------------------------------------------------------


def test_routed_all_count_equals_a_hand_computation():
    # V = 6 vision, T = 5 text of which P = 2 before the image; layer 0 dense, layer 1 keeps half
    result = count_flops(
        SMALL, [1.0, 0.5], vision_tokens=6, text_tokens=5, routed_tokens="all", prefix_text_tokens=2
    )
    per_token = 2 * (4 * 8 * 8 + 3 * 8 * 16)  # q, k, v, o and gate, up, down: 1280
    # layer 1: the 3 question tokens pass, floor((6 + 2) * 0.5) = 4 of the 8 competing are kept
    assert [row.tokens for row in result.layers] == [11, 7]
    assert [row.kept_competing for row in result.layers] == [8, 4]
    assert [row.kept_vision for row in result.layers] == [6, None]  # the router decides the split
    router = 2 * 8 * 11  # Linear(8, 1) over every token entering layer 1
    lm_head = 2 * 11 * 8 * 10
    assert result.flops == 11 * per_token + 7 * per_token + router + lm_head == 24976
    assert result.components["routers"] == router
    assert result.baseline_flops == 2 * 11 * per_token + lm_head
    assert result.kv_cache_bytes == (11 + 7) * 2 * 8 * 2  # K and V, 8 wide, bf16
    assert (result.competing_tokens, result.prefix_text_tokens) == (8, 2)

    # the same with only vision competing: floor(6 * 0.5) = 3 kept next to all 5 text tokens
    vision_only = count_flops(SMALL, [1.0, 0.5], vision_tokens=6, text_tokens=5)
    assert [row.tokens for row in vision_only.layers] == [11, 8]
    assert vision_only.flops == 11 * per_token + 8 * per_token + router + lm_head


def test_prefix_default_no_image_and_mod_layers_with_measured_ratio_one():
    preset = get_preset("llava-1.5-7b")
    default = count_flops(preset, [1.0] * 8 + [0.5] * 24, routed_tokens="all")
    assert default.prefix_text_tokens == DEFAULT_PREFIX_TEXT_TOKENS == 35
    # 23 question tokens pass, floor((576 + 35) / 2) = 305 competing are kept
    assert default.layers[8].tokens == 23 + 305
    # T below the default split: all text before the image competes
    assert (
        count_flops(
            SMALL, [1.0, 0.5], vision_tokens=6, text_tokens=5, routed_tokens="all"
        ).prefix_text_tokens
        == 5
    )
    # no image: no last image token, nothing competes, every layer processes every token
    no_image = count_flops(
        SMALL, [1.0, 0.5], vision_tokens=0, text_tokens=5, routed_tokens="all", prefix_text_tokens=2
    )
    assert [row.tokens for row in no_image.layers] == [5, 5] and no_image.competing_tokens == 0
    # a MoD layer that measured 1.0 is still a MoD layer: it keeps everything and pays its router
    measured = count_flops(SMALL, [1.0, 1.0], vision_tokens=6, text_tokens=5, mod_layers=[1])
    assert [row.kind for row in measured.layers] == ["dense", "MoD"]
    assert measured.components["routers"] == 2 * 8 * 11
    with pytest.raises(UserError, match="only compete when routed_tokens is 'all'"):
        count_flops(SMALL, [1.0, 0.5], prefix_text_tokens=3)
    with pytest.raises(UserError, match="between 0 and the 5 text tokens"):
        count_flops(
            SMALL,
            [1.0, 0.5],
            vision_tokens=6,
            text_tokens=5,
            routed_tokens="all",
            prefix_text_tokens=6,
        )


# ---- against real models ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["llava", "llava_next"])
def test_predicted_kv_lengths_equal_the_real_cache_with_text_competing(layout):
    model, processor = tiny_model("llama", layout, layers=4)
    apply_pmod(
        model,
        ratios=[0.5, 1.0, 0.3, 0.6],
        routed_tokens="all",
        masked_routing=True,
        shared_router=True,
    )
    randomize_routers(model, std=1.0)
    prompt = build_prompt(processor, "how many circles are there on the left side?")
    inputs = processor(text=[prompt], images=[random_image(70, 50, 3)], return_tensors="pt")
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    num_vision = len(image_positions)
    num_text = inputs["input_ids"].shape[1] - num_vision
    prefix = int(image_positions.max()) + 1 - num_vision  # text tokens up to the last image token
    assert prefix > 0 and num_text - prefix > 0  # the prompt has text on both sides of the image

    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    predicted = count_flops(
        shape_from_hf_config(model.config),
        model.retention_ratios,
        vision_tokens=num_vision,
        text_tokens=num_text,
        routed_tokens="all",
        prefix_text_tokens=prefix,
    )
    assert kv_cache_lengths(cache) == [[row.tokens] for row in predicted.layers]
    assert predicted.mod_layers == [0, 2, 3]
    # the helper of the training summary and eval report reads routed_tokens from the model
    from_model = count_flops_for_model(
        model, vision_tokens=num_vision, text_tokens=num_text, prefix_text_tokens=prefix
    )
    assert from_model.routed_tokens == "all" and from_model.flops == predicted.flops


def test_shared_router_count_equals_flop_counter_on_real_prefill():
    # tiny_prefill_inputs puts T // 2 text tokens before the image, the rest after it
    model = AutoModelForImageTextToText.from_config(
        TINY_LLAVA.to_hf_config(), attn_implementation="eager"
    ).eval()
    apply_pmod(
        model,
        ratios=[0.5, 1.0, 0.3, 0.6],
        routed_tokens="all",
        shared_router=True,
        router_input="normed",
    )
    measured, cache = measure(model, tiny_prefill_inputs(TINY_LLAVA))
    predicted = count_flops(
        TINY_LLAVA,
        model.retention_ratios,
        dtype="fp32",
        routed_tokens="all",
        prefix_text_tokens=TINY_LLAVA.text_tokens // 2,
    )
    # one shared Linear(d, 1), run by each of the 3 MoD layers over every token
    assert predicted.components["routers"] == 3 * 2 * 64 * (
        TINY_LLAVA.text_tokens + TINY_LLAVA.vision_tokens
    )
    assert measured["paper"] == predicted.flops
    assert kv_cache_lengths(cache) == [[row.tokens] for row in predicted.layers]


# ---- the command line: configs with gamma-MoD options ---------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A threshold-routing p-MoD checkpoint (text competing), a top-k one with a mod_layers
    list, and calibration samples with images."""
    root = tmp_path_factory.mktemp("flops_gamma")
    model, processor = tiny_model("llama", "llava", layers=4, seed=2)
    apply_pmod(
        model,
        beta=0.5,
        routed_tokens="all",
        masked_routing=True,
        inference_routing="threshold",
        routing_threshold=0.5,
    )
    randomize_routers(model, std=1.0, seed=3)
    model.save_pretrained(root / "threshold")
    processor.save_pretrained(root / "threshold")
    listed, _ = tiny_model("llama", "llava", layers=4)
    apply_pmod(listed, schedule="constant", beta=0.4, mod_layers=[1, 3], routed_tokens="all")
    listed.config.save_pretrained(root / "listed")
    (root / "images").mkdir()
    samples = []
    for index in range(3):
        random_image(40 + 20 * index, 60, 10 + index).save(root / "images" / f"{index}.png")
        samples.append(
            {
                "id": f"c{index}",
                "image": f"images/{index}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\ndescribe the image" + " please" * index},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    (root / "calib.json").write_text(json.dumps(samples))
    return root


def reference_ratios(checkpoint, data, num_samples):
    """Kept share of the competing tokens per MoD layer, from record_routing, one sample at a time;
    competing: every real token up to the last image token (routed_tokens="all" at inference)."""
    from transformers import AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    samples = json.loads(data.read_text())[:num_samples]
    shares = {}
    for sample in samples:
        question = sample["conversations"][0]["value"].replace("<image>", "").strip()
        image = Image.open(data.parent / sample["image"]).convert("RGB")
        inputs = processor(
            text=[build_prompt(processor, question)], images=[image], return_tensors="pt"
        )
        with torch.no_grad(), record_routing(model) as routing:
            model(**inputs)
        for layer, decision in routing.layers.items():
            last_image = int(decision.vision_mask[0].nonzero().max())
            competing = torch.arange(decision.keep_mask.shape[1]) <= last_image
            share = int((decision.keep_mask[0] & competing).sum()) / int(competing.sum())
            shares.setdefault(layer, []).append(share)
    ratios = [1.0] * len(model.model.language_model.layers)
    for layer, values in shares.items():
        ratios[layer] = sum(values) / len(values)
    return ratios, sorted(shares)


@pytest.mark.slow
def test_calibration_measures_the_threshold_ratios_record_routing_shows(
    checkpoints, monkeypatch, capsys
):
    checkpoint, data = checkpoints / "threshold", checkpoints / "calib.json"
    code, out, err = run_pmod(
        [
            "flops",
            "--config",
            checkpoint,
            "--calibration",
            data,
            "--calibration-samples",
            2,
            "--json",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    expected, mod_layers = reference_ratios(checkpoint, data, 2)
    assert report["plans"][0]["retention_ratios"] == pytest.approx(expected, abs=1e-12)
    assert report["plans"][0]["mod_layers"] == mod_layers == [1, 2, 3]
    # a threshold decision, not top-k: the measured shares are not the schedule's
    assert report["plans"][0]["retention_ratios"] != PMoDConfig(beta=0.5).retention_ratios(4)
    assert (
        report["plans"][0]["ratios_source"]
        == "ratios measured on 2 calibration samples (threshold routing)"
    )
    assert (
        report["plans"][0]["calibration"]["samples"] == 2
        and report["inference_routing"] == "threshold"
    )
    assert (
        report["routed_tokens"] == "all"
        and report["prefix_text_tokens"] == DEFAULT_PREFIX_TEXT_TOKENS
    )
    # the count uses the measured ratios, with every MoD layer's router
    shape = shape_from_hf_config(AutoModelForImageTextToText.from_pretrained(checkpoint).config)
    counted = count_flops(
        shape, expected, mod_layers=mod_layers, text_tokens=58, routed_tokens="all"
    )
    assert (
        report["plans"][0]["flops"] == counted.flops
        and report["plans"][0]["kv_cache_bytes"] == counted.kv_cache_bytes
    )

    code, out, err = run_pmod(
        ["flops", "--config", checkpoint, "--calibration", data], monkeypatch, capsys
    )
    assert code == 0, err
    assert "ratios measured on 3 calibration samples (threshold routing)" in out
    assert "p-MoD (measured ratios)" in out and "kept competing" in out


def test_threshold_routing_without_calibration_is_one_line_error(checkpoints, monkeypatch, capsys):
    code, out, err = run_pmod(["flops", "--config", checkpoints / "threshold"], monkeypatch, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "threshold routing" in lines[0] and "--calibration FILE.json" in lines[0]


def test_mod_layers_list_and_routed_tokens_from_the_config(checkpoints, monkeypatch, capsys):
    code, out, err = run_pmod(
        ["flops", "--config", checkpoints / "listed", "--json"], monkeypatch, capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["plans"][0]["mod_layers"] == [1, 3] and report["routed_tokens"] == "all"
    ratios = PMoDConfig(schedule="constant", beta=0.4, mod_layers=[1, 3]).retention_ratios(4)
    assert report["plans"][0]["retention_ratios"] == ratios
    expected = count_flops(
        read_model_shape(checkpoints / "listed"), ratios, text_tokens=58, routed_tokens="all"
    )
    assert (
        report["plans"][0]["flops"] == expected.flops
        and report["prefix_text_tokens"] == DEFAULT_PREFIX_TEXT_TOKENS
    )
    code, out, _ = run_pmod(
        ["flops", "--config", checkpoints / "listed", "--prefix-text-tokens", "10", "--json"],
        monkeypatch,
        capsys,
    )
    report_10 = json.loads(out)
    assert report_10["prefix_text_tokens"] == 10
    # fewer competing text tokens: more tokens pass every MoD layer
    assert report_10["plans"][0]["flops"] > report["plans"][0]["flops"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--calibration", "{data}"], "give --config CHECKPOINT_DIR"),
        (["--config", "{threshold}", "--calibration", "{data}", "--beta", "0.3"], "drop --beta"),
        (["--config", "{threshold}", "--calibration", "{root}/nowhere.json"], "calibration file"),
        (
            ["--config", "{threshold}/config.json", "--calibration", "{data}"],
            "checkpoint directory with weights",
        ),
        (
            ["--config", "{threshold}", "--calibration", "{data}", "--calibration-samples", "0"],
            "at least 1",
        ),
        (["--calibration-samples", "4"], "only applies with --calibration"),
        (["--prefix-text-tokens", "10"], "add --routed-tokens all"),
        (["--routed-tokens", "text"], "--routed-tokens must be one of vision, all"),
        (
            ["--routed-tokens", "all", "--prefix-text-tokens", "80"],
            "--prefix-text-tokens 80 is more than the 58 text tokens",
        ),
    ],
)
def test_bad_gamma_flags_end_in_one_line_and_exit_2(
    args, message, checkpoints, monkeypatch, capsys
):
    paths = {
        "data": checkpoints / "calib.json",
        "threshold": checkpoints / "threshold",
        "root": checkpoints,
    }
    code, out, err = run_pmod(["flops", *(a.format(**paths) for a in args)], monkeypatch, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]


def test_calibration_takes_a_tiny_name(checkpoints, monkeypatch, capsys):
    code, out, err = run_pmod(
        ["flops", "--config", checkpoints / "threshold", "--calibration", "tiny:shapes/heldout.json",
         "--calibration-samples", 2, "--device", "cpu", "--json"],
        monkeypatch, capsys,
    )  # fmt: skip
    assert code == 0, err
    calibration = json.loads(out)["plans"][0]["calibration"]
    assert calibration["data"] == str(resolve_tiny_path("tiny:shapes/heldout.json"))
    assert calibration["samples"] == 2


def test_device_without_calibration_is_a_user_error(checkpoints, monkeypatch, capsys):
    code, out, err = run_pmod(["flops", "--device", "cpu"], monkeypatch, capsys)
    assert (
        code == 2
        and out == ""
        and err.startswith("error: --device only applies with --calibration")
    )
