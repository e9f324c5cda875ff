"""`pmod flops`: the paper's numbers, the formula against torch's FLOP counter on real models,
the presets against real HF configs, and the command line."""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib import metadata

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageTextToText

from pmod_cli import PMoDConfig, apply_pmod, cli
from pmod_cli.efficiency.flops import count_flops, count_flops_for_model
from pmod_cli.efficiency.plan import FLOPS_SCHEMA_VERSION
from pmod_cli.errors import UserError
from pmod_cli.model import kv_cache_bytes, kv_cache_lengths, retention_ratios
from pmod_cli.model.presets import (
    PRESETS,
    ModelShape,
    TextShape,
    VisionShape,
    get_preset,
    read_model_shape,
    shape_from_hf_config,
)

# ---- the paper's tables (Tables 1 and 3) -------------------------------------------------

PAPER_ROWS = [
    # preset, beta (None = dense), TFLOPs, KV cache (mean retention)
    ("llava-next-7b", None, 39.46, 1.0),
    ("llava-next-7b", 0.5, 21.94, 0.538),
    ("llava-next-7b", 0.4, 19.56, 0.475),
    ("llava-1.5-7b", None, 8.38, 1.0),
    ("llava-1.5-7b", 0.5, 4.92, 0.538),
]


def preset_count(name, beta, **kwargs):
    shape = get_preset(name)
    ratios = None if beta is None else retention_ratios(shape.text.num_layers, beta=beta)
    return count_flops(shape, ratios, **kwargs)


@pytest.mark.parametrize("name,beta,tflops,kv", PAPER_ROWS)
def test_paper_count_reproduces_the_paper_tables(name, beta, tflops, kv):
    result = preset_count(name, beta)
    assert result.count == "paper"
    assert result.tflops == pytest.approx(tflops, rel=0.005)
    assert result.kv_cache_ratio == pytest.approx(kv, rel=0.005)
    assert result.baseline_tflops == pytest.approx(
        39.46 if name == "llava-next-7b" else 8.38, rel=0.005
    )


def test_beta_03_gives_what_the_rule_gives_not_the_paper_row():
    result = preset_count("llava-next-7b", 0.3)
    # reference-facts: the released rule makes every layer MoD: 16.48 TFLOPs, 39.4 % KV
    assert result.mod_layers == list(range(32))
    assert result.tflops == pytest.approx(16.48, rel=0.005)
    assert result.kv_cache_ratio == pytest.approx(0.394, rel=0.005)
    # the paper's 17.78 / 42.3 % is a known discrepancy; the count must not drift towards it
    assert abs(result.tflops / 17.78 - 1) > 0.05
    assert abs(result.kv_cache_ratio / 0.423 - 1) > 0.05


def test_default_token_counts_follow_the_image_layouts():
    assert get_preset("llava-1.5-7b").vision_tokens == 24 * 24  # CLIP-336/14 without CLS
    assert get_preset("llava-1.5-7b").vision_crops == 1
    # LLaVA-NeXT at its 2x2 grid: base 24x24 + (48 rows of 48 features + a newline each)
    assert get_preset("llava-next-7b").vision_tokens == 24 * 24 + 48 * 49 == 2928
    assert get_preset("llava-next-13b").vision_crops == 5
    # SigLIP-384/14: 27x27 per crop, no CLS; OneVision's largest anyres_max_9 layout is a 5x2 grid
    # (135 x 54 features, within 10 % of 9 crops, so not shrunk), each row closed by a newline
    assert get_preset("llava-onevision-qwen2-7b").vision_tokens == 27 * 27 + 135 * 55
    assert get_preset("llava-onevision-qwen2-0.5b").vision_crops == 1 + 10
    assert all(shape.text_tokens == 58 for shape in PRESETS.values())


def test_kv_cache_bytes_count_every_layers_cached_tokens():
    result = preset_count("llava-1.5-7b", 0.5, dtype="fp16")
    # dense layer: T + V tokens, K and V, 32 heads x 128, 2 bytes
    assert result.layers[0].kv_cache_bytes == (58 + 576) * 2 * 4096 * 2
    assert result.baseline_kv_cache_bytes == 32 * (58 + 576) * 2 * 4096 * 2
    assert result.kv_cache_bytes == sum(
        (58 + row.kept_vision) * 2 * 4096 * 2 for row in result.layers
    )
    # the real cache keeps the text tokens in every layer, so it shrinks less than the paper's %
    assert result.kv_cache_ratio < result.kv_cache_bytes_ratio < 1
    # grouped-query attention caches only the 4 KV heads of Qwen2-7B
    qwen = preset_count("llava-onevision-qwen2-7b", None, dtype="bf16")
    assert qwen.layers[0].kv_cache_bytes == (58 + qwen.vision_tokens) * 2 * 4 * 128 * 2


def test_full_count_adds_labelled_components_to_the_paper_count():
    paper = preset_count("llava-next-7b", 0.5)
    full = preset_count("llava-next-7b", 0.5, count="full")
    for key, flops in paper.components.items():
        assert full.components[key] == flops
    extra = {"attention_products", "vision_tower", "projector"}
    assert set(full.components) - set(paper.components) == extra
    assert full.flops == paper.flops + sum(full.components[key] for key in extra)
    # vision tower and projector do not depend on the schedule
    assert full.components["vision_tower"] == full.baseline_components["vision_tower"] > 0


# ---- presets build real HF configs -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_real_hf_models_with_the_same_shape(name):
    shape = PRESETS[name]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(shape.to_hf_config())
    assert type(model) is shape.family.dense_model_class
    read_back = shape_from_hf_config(model.config)
    assert read_back.vision == shape.vision
    assert read_back.vision_tokens == shape.vision_tokens
    assert read_back.image_grid_pinpoints == shape.image_grid_pinpoints
    # the HF vocabulary gains rows for the image token (Vicuna: 32000 -> 32064, as llava-hf)
    assert (
        shape.image_token_id
        < read_back.text.vocab_size
        <= max(shape.text.vocab_size, shape.image_token_id + 64)
    )
    assert dataclasses.replace(read_back.text, vocab_size=shape.text.vocab_size) == shape.text
    params = sum(p.numel() for p in model.parameters())
    # the llava-hf checkpoints' sizes: 7.06B (1.5-7b, v1.6-vicuna-7b), 13.4B (1.5-13b, v1.6-vicuna-13b)
    expected_billions = {
        "llava-1.5-7b": 7.06,
        "llava-next-7b": 7.06,
        "llava-1.5-13b": 13.35,
        "llava-next-13b": 13.35,
    }
    if name in expected_billions:
        assert params / 1e9 == pytest.approx(expected_billions[name], abs=0.005)


def test_preset_hf_config_can_be_p_mod():
    config = get_preset("llava-1.5-7b").to_hf_config(pmod=PMoDConfig(beta=0.4))
    assert config.model_type == "pmod_llava"
    assert PMoDConfig.from_dict(config.pmod).beta == 0.4


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match="llava-next-7b"):
        get_preset("llava-2-7b")


# ---- cross-check against torch's FLOP counter on real p-MoD prefills ----------------------

TINY_LLAVA = ModelShape(
    "tiny-llava",
    "llava",
    TextShape(
        "llama",
        num_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=4,
        vocab_size=300,
    ),
    VisionShape(
        "clip_vision_model",
        num_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        image_size=56,
        patch_size=14,
    ),
    image_token_id=299,
    text_tokens=9,
)
# LLaVA-NeXT layout with a SigLIP tower (no CLS, pooling head) and a GQA Qwen2 decoder
TINY_NEXT = ModelShape(
    "tiny-next",
    "llava_next",
    TextShape(
        "qwen2",
        num_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=300,
    ),
    VisionShape(
        "siglip_vision_model",
        num_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        image_size=28,
        patch_size=14,
        select_strategy="full",
        pooling_head=True,
    ),
    image_token_id=299,
    image_grid_pinpoints=((28, 56), (56, 28), (56, 56)),
    text_tokens=7,
)


# LLaVA-OneVision: SigLIP tower, Qwen2; the 224 px grid (16 x 16 features) is shrunk to 12 x 12 by
# anyres_max_9, and a video frame is 4 x 4 features pooled to 2 x 2
TINY_ONEVISION = ModelShape(
    "tiny-onevision",
    "llava_onevision",
    TINY_NEXT.text,
    dataclasses.replace(TINY_NEXT.vision, image_size=56, pooling_head=False),
    image_token_id=299,
    video_token_id=298,
    image_grid_pinpoints=((56, 56), (56, 112), (112, 112), (224, 224)),
    text_tokens=7,
)


def tiny_prefill_inputs(shape: ModelShape) -> dict:
    """One prompt with the image at its largest layout: text, V image tokens, text."""
    head = shape.text_tokens // 2
    input_ids = [1 + i for i in range(head)] + [shape.image_token_id] * shape.vision_tokens
    input_ids += [50 + i for i in range(shape.text_tokens - head)]
    size = shape.vision.image_size
    generator = torch.Generator().manual_seed(0)
    if shape.layout == "llava":
        return {
            "input_ids": torch.tensor([input_ids]),
            "pixel_values": torch.randn(1, 3, size, size, generator=generator),
        }
    height, width = max(shape.image_grid_pinpoints, key=lambda p: p[0] * p[1])
    return {
        "input_ids": torch.tensor([input_ids]),
        "pixel_values": torch.randn(1, shape.vision_crops, 3, size, size, generator=generator),
        "image_sizes": torch.tensor([[height, width]]),
    }


def measure(model, inputs):
    """FLOPs per module of one prefill, as torch's FLOP counter sees them, and the cache."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model(**inputs, use_cache=True)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def module(path, ops=None):
        return sum(
            n
            for op, n in counts.get(f"{root}.{path}", {}).items()
            if ops is None or str(op).split(".")[-1] in ops
        )

    measured = {
        "total": sum(counts["Global"].values()),
        # linear layers (and routers) of the decoder + lm_head: what the paper's count covers
        "paper": module("model.language_model", {"mm", "addmm"}) + module("lm_head"),
        "attention_products": module("model.language_model", {"bmm", "baddbmm"}),
        "vision_tower": module("model.vision_tower"),
        "projector": module("model.multi_modal_projector"),
    }
    return measured, output.past_key_values


@pytest.mark.parametrize(
    "shape,pmod",
    [
        (TINY_LLAVA, PMoDConfig(beta=0.5)),  # PRD: layer 0 dense, ratios 0.75, 0.25, 0.15
        (TINY_NEXT, PMoDConfig(ratios=[0.5, 1.0, 0.3, 0.6])),  # layer 0 is a MoD layer
        (TINY_ONEVISION, PMoDConfig(beta=0.5)),
    ],
    ids=["llava-clip-llama", "next-siglip-qwen2", "onevision-anyres-max-9"],
)
def test_analytic_count_equals_flop_counter_on_real_prefill(shape, pmod):
    torch.manual_seed(0)
    # eager attention multiplies every query-key pair with matmuls the FLOP counter sees
    model = AutoModelForImageTextToText.from_config(
        shape.to_hf_config(), attn_implementation="eager"
    ).eval()
    inputs = tiny_prefill_inputs(shape)

    dense_measured, dense_cache = measure(model, inputs)
    dense = count_flops(shape, count="full", attention_pairs="all", dtype="fp32")
    assert dense_measured["total"] == dense.baseline_flops == dense.flops
    assert kv_cache_bytes(dense_cache) == dense.baseline_kv_cache_bytes

    apply_pmod(model, pmod)
    measured, cache = measure(model, inputs)
    paper = count_flops(shape, model.retention_ratios, count="paper", dtype="fp32")
    full = count_flops(
        shape, model.retention_ratios, count="full", attention_pairs="all", dtype="fp32"
    )
    assert any(row.kind == "MoD" for row in full.layers)
    assert measured["paper"] == paper.flops
    for component in ("attention_products", "vision_tower", "projector"):
        assert measured[component] == full.components[component], component
    assert measured["total"] == full.flops
    # the cache holds exactly the predicted T + floor(V * R_l) entries per layer
    assert kv_cache_lengths(cache) == [[row.tokens] for row in full.layers]
    assert kv_cache_bytes(cache) == full.kv_cache_bytes
    # the helper for the training summary and eval report reads the same from the live model
    from_model = count_flops_for_model(model, text_tokens=shape.text_tokens)
    assert from_model.flops == paper.flops and from_model.dtype == "float32"
    assert from_model.retention_ratios == paper.retention_ratios


def test_video_count_equals_flop_counter_on_a_real_video_prefill():
    """Frames through the tower and projector, pooled 2x2 (bilinear: not a multiply the count or
    the FLOP counter sees), then frames x 4 + 1 vision tokens in the language model."""
    torch.manual_seed(0)
    shape, frames = TINY_ONEVISION, 3
    model = AutoModelForImageTextToText.from_config(
        shape.to_hf_config(), attn_implementation="eager"
    ).eval()
    vision_tokens, crops = shape.video_tokens(frames)
    assert (vision_tokens, crops) == (frames * 4 + 1, frames)
    input_ids = [1, 2, 3] + [shape.video_token_id] * vision_tokens + [50, 51, 52, 53]
    inputs = {
        "input_ids": torch.tensor([input_ids]),
        "pixel_values_videos": torch.randn(
            1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(0)
        ),
    }
    apply_pmod(model, PMoDConfig(ratios=[0.5, 1.0, 0.3, 0.6]))
    measured, cache = measure(model, inputs)
    full = count_flops(
        shape,
        model.retention_ratios,
        count="full",
        attention_pairs="all",
        dtype="fp32",
        video_frames=frames,
    )
    assert full.vision_tokens == vision_tokens and full.vision_crops == frames
    for component in ("attention_products", "vision_tower", "projector"):
        assert measured[component] == full.components[component], component
    assert measured["total"] == full.flops
    assert kv_cache_lengths(cache) == [[row.tokens] for row in full.layers]


def test_onevision_token_counts_follow_the_processor_rules():
    """The preset's counts come from the rules LlavaOnevisionProcessor applies: every pinpoint's
    one-image layout (anyres_max_9) and a video's pooled frames."""
    from tiny_models import tiny_tokenizer
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    from pmod_cli.model.families.geometry import anyres_tokens

    shape = get_preset("llava-onevision-qwen2-7b")
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(),
        video_processor=LlavaOnevisionVideoProcessor(),
        tokenizer=tokenizer,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
    )
    sizes = [list(pinpoint) for pinpoint in shape.image_grid_pinpoints] + [
        [480, 640],
        [1000, 300],
        [300, 2000],
    ]
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    counted = [
        anyres_tokens(
            h, w, grid_pinpoints=shape.image_grid_pinpoints, tile_size=384, side=27, max_crops=9
        )[0]
        for h, w in sizes
    ]
    assert counted == expected
    assert shape.vision_tokens == max(expected[: len(shape.image_grid_pinpoints)])
    video = processor._get_num_multimodal_tokens(video_sizes=[[32, 384, 384]])["num_video_tokens"]
    assert shape.video_tokens(32)[0] == video[0] == 32 * 196 + 1
    result = count_flops(shape, [1.0] * shape.text.num_layers, video_frames=32)
    assert result.vision_tokens == 32 * 196 + 1
    with pytest.raises(UserError, match="takes no video"):
        count_flops(get_preset("llava-next-7b"), video_frames=8)


def test_causal_pairs_count_each_query_against_earlier_keys_only():
    causal = count_flops(TINY_LLAVA, count="full")
    square = count_flops(TINY_LLAVA, count="full", attention_pairs="all")
    tokens = TINY_LLAVA.text_tokens + TINY_LLAVA.vision_tokens
    per_pair = square.components["attention_products"] / (4 * tokens * tokens)
    assert causal.components["attention_products"] == 4 * per_pair * tokens * (tokens + 1) // 2


# ---- reading configs ---------------------------------------------------------------------


def test_read_model_shape_from_saved_dense_and_pmod_configs(tmp_path):
    dense_dir, pmod_dir = tmp_path / "dense", tmp_path / "pmod"
    TINY_NEXT.to_hf_config().save_pretrained(dense_dir)
    TINY_NEXT.to_hf_config(pmod=PMoDConfig(beta=0.3, min_ratio=0.2)).save_pretrained(pmod_dir)
    dense = read_model_shape(dense_dir)
    assert (dense.text, dense.vision, dense.vision_tokens, dense.pmod) == (
        TINY_NEXT.text,
        TINY_NEXT.vision,
        TINY_NEXT.vision_tokens,
        None,
    )
    pmod = read_model_shape(pmod_dir / "config.json")
    assert (pmod.pmod.beta, pmod.pmod.min_ratio) == (0.3, 0.2)


@pytest.mark.parametrize(
    "content,problem",
    [
        ("{not json", "as JSON"),
        ('{"model_type": "bert"}', "model_type 'bert'"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_unreadable_configs_are_user_errors(tmp_path, content, problem):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(UserError, match=problem):
        read_model_shape(path)


# ---- the command line ----------------------------------------------------------------------


def run_pmod(args, monkeypatch, capsys):
    """Run ``pmod ARGS`` through the real entry point; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["pmod", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_json_defaults_to_the_papers_setting(monkeypatch, capsys):
    code, out, err = run_pmod(["flops", "--json"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads(out)  # exactly one JSON object on stdout
    assert report["model"] == "llava-next-7b" and report["count"] == "paper"
    assert (
        report["schema_version"] == FLOPS_SCHEMA_VERSION
        and report["command"] == "pmod flops --json"
    )
    assert report["versions"]["torch"] == metadata.version("torch")
    (plan,) = report["plans"]
    assert plan["beta"] == 0.5
    assert plan["baseline_tflops"] == pytest.approx(39.46, rel=0.005)
    assert plan["tflops"] == pytest.approx(21.94, rel=0.005)
    assert plan["kv_cache_ratio"] == pytest.approx(0.538, rel=0.005)
    assert len(plan["retention_ratios"]) == 32 and plan["retention_ratios"][:8] == [1.0] * 8
    assert [row["kind"] for row in plan["layers"]][7:9] == ["dense", "MoD"]


def test_cli_several_betas_give_one_plan_each(monkeypatch, capsys):
    code, out, _ = run_pmod(
        [
            "flops",
            "--model",
            "llava-1.5-7b",
            "--beta",
            "0.5",
            "--beta",
            "0.4",
            "--count",
            "full",
            "--json",
        ],
        monkeypatch,
        capsys,
    )
    report = json.loads(out)
    assert code == 0 and report["count"] == "full"
    assert [plan["beta"] for plan in report["plans"]] == [0.5, 0.4]
    first, second = report["plans"]
    # each setting once, in plans; the top level holds what they share
    assert not {"tflops", "beta", "layers", "retention_ratios"} & set(report)
    assert second["tflops"] < first["tflops"] < first["baseline_tflops"]
    # the full count is above the paper count for the same setting
    assert first["tflops"] > preset_count("llava-1.5-7b", 0.5).tflops
    assert "vision_tower" in first["components_flops"]


def test_cli_tables_label_the_count_mode(monkeypatch, capsys):
    code, out, _ = run_pmod(
        ["flops", "--model", "llava-1.5-7b", "--dtype", "fp16"], monkeypatch, capsys
    )
    assert code == 0
    assert "paper count" in out and "53.8%" in out and "fp16" in out
    assert "8.38" in out and "4.92" in out
    code, out, _ = run_pmod(
        ["flops", "--model", "llava-1.5-7b", "--count", "full"], monkeypatch, capsys
    )
    assert "full count" in out and "vision tower" in out


def test_cli_plot_writes_a_png(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ratios.png"
    code, out, _ = run_pmod(
        ["flops", "--beta", "0.5", "--beta", "0.3", "--plot", str(path), "--json"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and json.loads(out)["plot"] == str(path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_cli_reads_dense_and_pmod_checkpoint_configs(tmp_path, monkeypatch, capsys):
    dense_dir, pmod_dir = tmp_path / "dense", tmp_path / "pmod"
    TINY_LLAVA.to_hf_config().save_pretrained(dense_dir)
    # a real p-MoD checkpoint's config, written by the converted model itself
    model = AutoModelForImageTextToText.from_config(TINY_LLAVA.to_hf_config())
    apply_pmod(model, beta=0.3, min_ratio=0.2)
    model.config.save_pretrained(pmod_dir)

    _, out, _ = run_pmod(["flops", "--config", str(dense_dir), "--json"], monkeypatch, capsys)
    report = json.loads(out)
    assert report["vision_tokens"] == TINY_LLAVA.vision_tokens and report["plans"][0]["beta"] == 0.5
    assert report["text_tokens"] == 58  # a config does not store T: the paper's default
    baseline = count_flops(TINY_LLAVA, text_tokens=58).baseline_flops
    assert report["plans"][0]["baseline_flops"] == baseline

    _, out, _ = run_pmod(["flops", "--config", str(pmod_dir), "--json"], monkeypatch, capsys)
    (plan,) = json.loads(out)["plans"]
    assert (plan["beta"], plan["min_ratio"]) == (0.3, 0.2)
    assert plan["retention_ratios"] == model.retention_ratios

    # flags override the stored setting, the rest of it stays
    _, out, _ = run_pmod(
        ["flops", "--config", str(pmod_dir), "--beta", "0.5", "--json"], monkeypatch, capsys
    )
    (plan,) = json.loads(out)["plans"]
    assert (plan["beta"], plan["min_ratio"]) == (0.5, 0.2)

    # every dtype spelling; auto is the dtype a checkpoint's config.json names, else bf16
    half_dir = tmp_path / "half"
    half_dir.mkdir()
    stored = json.loads((pmod_dir / "config.json").read_text())
    (half_dir / "config.json").write_text(json.dumps({**stored, "dtype": "float16"}))
    kv_bytes = {}
    for config, dtype in ((pmod_dir, "bfloat16"), (pmod_dir, "bf16"), (pmod_dir, "auto"),
                          (pmod_dir, "float32"), (half_dir, "auto")):  # fmt: skip
        _, out, err = run_pmod(
            ["flops", "--config", str(config), "--dtype", dtype, "--json"], monkeypatch, capsys
        )
        report = json.loads(out)
        kv_bytes[config.name, dtype] = (report["dtype"], report["plans"][0]["kv_cache_bytes"])
    bf16 = kv_bytes["pmod", "bf16"]
    assert bf16[0] == "bf16" and kv_bytes["pmod", "bfloat16"] == kv_bytes["pmod", "auto"] == bf16
    assert kv_bytes["pmod", "float32"] == ("fp32", 2 * bf16[1])
    assert kv_bytes["half", "auto"] == ("fp16", bf16[1])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--beta", "-0.1"], "--beta must be >= 0"),
        (["--min-ratio", "0.9", "--max-ratio", "0.5"], "--min-ratio 0.9 is above --max-ratio 0.5"),
        (["--max-ratio", "1.5"], "--max-ratio must be in (0, 1]"),
        (["--model", "llava-2-7b"], "known presets: llava-1.5-7b"),
        (["--config", "{missing}"], "does not exist"),
        (["--config", "{garbage}"], "as JSON"),
        (["--count", "exact"], "--count must be one of paper, full"),
        (["--dtype", "int4"], "--dtype must be one of"),
        (["--schedule", "zigzag"], "unknown --schedule 'zigzag'"),
        (["--vision-tokens", "-5"], "--vision-tokens must be >= 0"),
        (["--model", "llava-1.5-7b", "--config", "{garbage}"], "either --model or --config"),
    ],
)
def test_cli_bad_values_end_in_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    garbage = tmp_path / "config.json"
    garbage.write_text("{broken")
    args = [a.format(missing=tmp_path / "nowhere", garbage=garbage) for a in args]
    code, out, err = run_pmod(["flops", *args], monkeypatch, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
