"""PyramidDrop (``pdrop``): the kept sets against an independent derivation of the official rule
from the eager attention probabilities of HF's own attention modules, the count against torch's
FLOP counter, attention backends, caching and batching, families, flags and --match-tflops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flop_counting import counted_flops, prefill_flops
from method_checks import (
    assert_backends_keep_alike,
    assert_cached_uncached_and_alone_agree,
    assert_same_generation,
    backends,
    capture_layer_inputs,
    eager_row_attention,
    flops_refusal,
    generate,
    kept_masks,
    method_model,
    vision_of,
)
from tiny_models import random_image, random_video, tiny_model
from typer.testing import CliRunner

from pmod_cli import apply_method
from pmod_cli.cli import app, main
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.efficiency import count_flops
from pmod_cli.errors import UserError
from pmod_cli.model import MethodError, PMoDConfig, kv_cache_lengths, make_method
from pmod_cli.model.cache import pmod_cache_layer
from pmod_cli.model.layer import PMoDLayerMixin
from pmod_cli.model.methods import parse_method
from pmod_cli.model.presets import get_preset, shape_from_hf_config
from pmod_cli.training.recipe import load_recipe

BUILDERS = {
    "llava": lambda **options: tiny_model("llama", "llava", **options),  # 4 heads, 2 kv heads
    "llava_next-qwen2": lambda **options: tiny_model("qwen2", "next", **options),
    "llava_onevision": lambda **options: tiny_model("qwen2", "onevision", **options),
    "qwen2_5_vl": lambda **options: tiny_model(layout="qwen2_5_vl", **options),
    "qwen3_vl": lambda **options: tiny_model(layout="qwen3_vl", **options),  # per-head q/k norms
}
SAMPLES = [
    ("what colour?", [random_image(60, 40, 0)], []),
    ("describe the two images please", [random_image(40, 90, 1), random_image(200, 190, 2)], []),
]
VIDEO_SAMPLE = ("what happens?", [], [random_video(4, 64, 96, 3)])


def batch(model, processor, indices=(0, 1)) -> dict:
    """Left-padded prompts of the family (a second sample with two images of other sizes)."""
    processor.tokenizer.padding_side = "left"
    rows = [SAMPLES[i] if i < 2 else VIDEO_SAMPLE for i in indices]
    prompts = [build_prompt(processor, q, len(images), num_videos=len(v)) for q, images, v in rows]
    videos = [video for _, _, row in rows for video in row]
    return encode(processor, prompts, [images for _, images, _ in rows], model, videos=videos)


def pdrop_model(family: str, spec: str = "pdrop", **options):
    return method_model(BUILDERS[family], spec, **options)


# ---- the rule ----------------------------------------------------------------------------------


def test_default_stages_are_the_official_8_16_24_with_lambda_half():
    method = make_method("pdrop")
    assert method.boundaries(32) == [8, 16, 24] and method.boundaries(28) == [7, 14, 21]
    kept = method.kept_vision_tokens([1.0] * 32, 576)
    assert kept == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert sum(kept) / 32 == 270  # the spec's average-token arithmetic for LLaVA-1.5
    assert method.layer_modes([1.0] * 32) == ["dense"] * 8 + ["subset"] * 24
    # a list is spelt with '/' ('+' is read too) and written back with '/'
    setting = parse_method("pdrop:layers=2+8+16,ratio=0.19")
    assert setting.spec == "pdrop:layers=2/8/16,ratio=0.19" and setting.boundaries(32) == [2, 8, 16]
    assert parse_method(setting.spec) == setting
    assert make_method("pdrop", layers=[2, 8, 16]) == setting.replace(ratio=0.5)
    # floor(V * lambda^s), guarded against round-off: 100 * 0.3^2 is 9, not 8
    assert make_method("pdrop", ratio=0.3).kept_vision_tokens([1.0] * 4, 100) == [100, 30, 9, 2]


def official_rule(model, inputs, captured, bounds, ratio, labels=None, reindex=False):
    """Per boundary: (batch, seq) bool, what the official code keeps, derived from scratch.

    The official code shortens the sequence: at boundary b the present tokens (text and the
    previous stage's vision tokens) form a new sequence, and layer b's attention over it ranks
    the vision tokens from the last prompt token (with labels: every token just before an answer
    span). Here that sequence is rebuilt from the layer's captured input and run through the
    layer's own eager attention module, at the original positions or (``reindex``) at 0, 1, ...
    as the official code renumbers them."""
    vision = vision_of(model, inputs)
    valid = inputs["attention_mask"].bool()
    present, expected = valid.clone(), {}
    for stage, boundary in enumerate(bounds, start=1):
        hidden, (cos, sin) = captured[boundary]
        keep = valid & ~vision
        for sample in range(hidden.shape[0]):
            index = present[sample].nonzero().view(-1)
            if labels is None:
                rows = [len(index) - 1]
            else:
                trained = labels[sample][index] != -100
                rows = [i for i in range(len(index) - 1) if trained[i + 1] and not trained[i]]
            in_vision = vision[sample][index]
            if not rows:  # a sample without an answer span drops nothing
                keep[sample] |= present[sample] & vision[sample]
                continue
            rope = (
                cos[min(sample, cos.shape[0] - 1), index],
                sin[min(sample, sin.shape[0] - 1), index],
            )
            if reindex:
                rope = contiguous_rope(model, hidden, len(index))
            received = eager_row_attention(
                model.decoder_layers[boundary],
                hidden[sample, index][None],
                rope[0][None],
                rope[1][None],
                rows,
            )
            count = math.floor(int(vision[sample].sum()) * ratio**stage + 1e-9)
            top = received[in_vision].topk(count).indices
            keep[sample, index[in_vision][top]] = True
        expected[boundary], present = keep, keep
    return expected


@pytest.mark.parametrize("family", ["llava", "llava_next-qwen2", "qwen3_vl"])
@pytest.mark.parametrize("spec,bounds,ratio", [("pdrop", [1, 2, 3], 0.5), ("pdrop:layers=1/3,ratio=0.6", [1, 3], 0.6)])  # fmt: skip
def test_kept_sets_equal_the_official_rule_derived_from_eager_attention(
    family, spec, bounds, ratio
):
    model, processor = pdrop_model(family, spec, attn="eager")
    inputs = batch(model, processor)
    captured, hooks = capture_layer_inputs(model, bounds)
    _, kept = kept_masks(model, inputs)
    for hook in hooks:
        hook.remove()
    expected = official_rule(model, inputs, captured, bounds, ratio)
    for layer, mask in kept.items():
        boundary = max(b for b in bounds if b <= layer)  # a stage keeps its boundary's set
        assert torch.equal(mask, expected[boundary]), (layer, boundary)
    assert sorted(kept) == list(range(bounds[0], 4))


def contiguous_rope(model, hidden, length):
    """(cos, sin) (length, head_dim) at positions 0 .. length - 1, from the model's rotary embedding."""
    positions = torch.arange(length)[None]
    cos, sin = model.model.language_model.rotary_emb(hidden, positions)
    return cos[0], sin[0]


@pytest.mark.parametrize("family", ["llava", "llava_next-qwen2"])
def test_reindexed_layers_compute_what_the_official_shortened_sequence_computes(family):
    """``positions=reindex``: the kept sets are the official rule's with the ranking at the
    renumbered positions, and every layer from the first boundary on gives each kept token what
    the untouched HF layer gives it on the shortened sequence at positions 0, 1, ... (the
    official code's); the caches hold those positions, decoding included."""
    model, processor = pdrop_model(family, "pdrop:positions=reindex", attn="eager")
    inputs = batch(model, processor)
    captured, hooks = capture_layer_inputs(model, range(4))
    outputs = {}
    hooks += [
        layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
        for i, layer in enumerate(model.decoder_layers)
    ]
    _, kept = kept_masks(model, inputs)
    for hook in hooks:
        hook.remove()
    expected = official_rule(model, inputs, captured, [1, 2, 3], 0.5, reindex=True)
    for layer in (1, 2, 3):
        assert torch.equal(kept[layer], expected[layer]), layer
        for sample in range(2):
            index = kept[layer][sample].nonzero().view(-1)
            states = captured[layer][0][sample, index][None]
            cos, sin = contiguous_rope(model, states, len(index))
            causal = torch.full((len(index),) * 2, torch.finfo(states.dtype).min).triu(1)
            shortened = super(PMoDLayerMixin, model.decoder_layers[layer]).forward(
                states,
                attention_mask=causal[None, None],
                position_embeddings=(cos[None], sin[None]),
            )
            assert torch.allclose(outputs[layer][sample, index], shortened[0], atol=1e-5), (
                layer,
                sample,
            )
    cached = assert_cached_uncached_and_alone_agree(
        model, inputs, lambda row: batch(model, processor, [row])
    )
    for layer in (1, 2, 3):
        held = pmod_cache_layer(cached.past_key_values, layer)
        for sample in range(2):
            positions = held.slot_positions[sample][held.slot_valid[sample]].tolist()
            assert positions == list(range(len(positions)))


def test_reindexing_moves_the_kept_tokens_and_is_refused_on_3d_rotary_positions():
    model, processor = pdrop_model("llava", attn="eager")
    inputs = batch(model, processor)
    kept_logits, kept = kept_masks(model, inputs)
    apply_method(model, "pdrop:positions=reindex")
    reindexed_logits, reindexed = kept_masks(model, inputs)
    assert torch.equal(kept[1], reindexed[1])  # the first boundary ranks the whole sequence alike
    assert not torch.allclose(kept_logits, reindexed_logits, atol=1e-3)
    for layout in ("qwen2_5_vl", "qwen3_vl"):
        model, _ = tiny_model(layout=layout)
        with pytest.raises(MethodError, match="positions=reindex does not run on .*3-D"):
            apply_method(model, "pdrop:positions=reindex")


def test_with_labels_the_rows_are_the_tokens_before_each_answer_span():
    """Training's rule: query rows are the tokens just before each answer span (several per
    sample), mean over them; a sample with no answer keeps every vision token."""
    model, processor = pdrop_model("llava", attn="eager")
    inputs = batch(model, processor)
    labels = torch.full_like(inputs["input_ids"], -100)
    last = inputs["input_ids"].shape[1]
    labels[0, last - 8 : last - 5] = inputs["input_ids"][0, last - 8 : last - 5]  # two answers
    labels[0, last - 2 :] = inputs["input_ids"][0, last - 2 :]
    captured, hooks = capture_layer_inputs(model, [1, 2, 3])
    _, kept = kept_masks(model, inputs, labels=labels)
    for hook in hooks:
        hook.remove()
    expected = official_rule(model, inputs, captured, [1, 2, 3], 0.5, labels)
    vision = vision_of(model, inputs)
    for layer in (1, 2, 3):
        assert torch.equal(kept[layer], expected[layer])
        assert int((kept[layer][0] & vision[0]).sum()) == 16 // 2**layer
        assert torch.equal(kept[layer][1], inputs["attention_mask"][1].bool())  # no answer


def test_gradient_checkpointing_reruns_each_stage_with_its_own_set():
    model, processor = pdrop_model("llava")
    model.train()
    inputs = batch(model, processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, : labels.shape[1] - 4] = -100
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for plain, rerun in zip(*grads, strict=True):
        assert torch.allclose(plain, rerun, atol=1e-6)


# ---- the count ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("spec", ["pdrop", "pdrop:layers=1/3,ratio=0.3"])
def test_count_equals_flop_counter_on_a_real_prefill(family, spec):
    """On a prefill of one image, the language model's linear layers as torch's FLOP counter sees
    them are the paper count plus the ranking's q of the query row and k of the present tokens
    (through the layers' q_proj / k_proj); everything it sees is the full count, whose
    ``method_ranking`` adds the row's query-key products. The cache holds T + each stage's."""
    model, processor = pdrop_model(family, spec, attn="eager")
    inputs = batch(model, processor, [0])
    vision = int(vision_of(model, inputs).sum())
    text = inputs["input_ids"].shape[1] - vision
    measured = prefill_flops(model, inputs)
    method, shape = model.token_method, shape_from_hf_config(model.config)
    paper, full = counted_flops(model, vision, text)
    d, q_dim, kv_dim = shape.text.hidden_size, shape.text.q_dim, shape.text.kv_dim
    bounds = method.boundaries(4)
    previous = [method.kept_vision_tokens([1.0] * 4, vision)[b - 1] for b in bounds]
    present = [text + n for n in previous if n > 0]  # nothing left to rank: no ranking
    projections = sum(2 * d * q_dim + 2 * n * d * kv_dim for n in present)
    products = sum(2 * n * q_dim for n in present)
    assert measured.linear == paper.flops + projections
    assert method.ranking_flops(shape, vision, text) == projections + products
    # --count full holds the ranking as a component of its own
    assert full.components["method_ranking"] == projections + products
    assert measured.total == full.flops
    assert measured.cache_lengths == [[row.tokens] for row in full.layers]


def test_ranking_flops_of_the_default_on_llava_1_5_7b():
    """Three boundaries of LLaVA-1.5-7B (d 4096, no GQA), T = 58: each ranks from one row over
    T + 576, T + 288, T + 144 tokens."""
    shape = get_preset("llava-1.5-7b")
    d = 4096
    expected = sum(2 * d * d + 2 * n * d * d + 2 * n * d for n in (634, 346, 202))
    assert make_method("pdrop").ranking_flops(shape, 576, 58) == expected
    counted = count_flops(shape, method=make_method("pdrop"))
    assert [row.tokens for row in counted.layers[7:9]] == [634, 346]


# ---- backends, caching, batching, families -----------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_eager_sdpa_and_flash_attention_keep_the_same_tokens(monkeypatch, family):
    model, processor = pdrop_model(family, attn="eager")
    assert_backends_keep_alike(model, batch(model, processor), monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_eager_sdpa_and_flash_attention_generate_alike(monkeypatch, family):
    model, processor = pdrop_model(family, attn="eager")
    inputs = batch(model, processor)
    runs = {name: generate(other, inputs) for name, other in backends(model, monkeypatch).items()}
    assert_same_generation(runs["sdpa"], runs["eager"])
    assert_same_generation(runs["flash_attention_2"], runs["eager"])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cached_equals_uncached_and_alone_equals_batched(family):
    model, processor = pdrop_model(family)
    indices = (0, 1, 2) if family == "qwen2_5_vl" else (0, 1)  # Qwen2.5-VL: a video too
    inputs = batch(model, processor, indices)
    cached = assert_cached_uncached_and_alone_agree(
        model, inputs, lambda row: batch(model, processor, [indices[row]])
    )
    # the cache of a stage's layers holds its text and kept vision tokens
    vision = vision_of(model, inputs).sum(dim=1).tolist()
    text = (inputs["attention_mask"].sum(dim=1) - vision_of(model, inputs).sum(dim=1)).tolist()
    plan = [model.token_method.kept_vision_tokens([1.0] * 4, n) for n in vision]
    lengths = kv_cache_lengths(cached.past_key_values)
    for layer in (1, 2, 3):
        assert lengths[layer] == [t + kept[layer] + 3 for t, kept in zip(text, plan, strict=True)]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_every_family_keeps_each_stage_s_count_of_each_sample(family):
    model, processor = pdrop_model(family)
    inputs = batch(model, processor)
    vision, real = vision_of(model, inputs), inputs["attention_mask"].bool()
    _, kept = kept_masks(model, inputs)
    for layer, mask in kept.items():
        planned = [
            model.token_method.kept_vision_tokens([1.0] * 4, int(n))[layer]
            for n in vision.sum(dim=1)
        ]
        assert (mask & vision).sum(dim=1).tolist() == planned
        assert torch.equal(mask & ~vision, real & ~vision)  # text always passes, padding never
        if layer > 1:  # nested: a stage chooses among the previous stage's tokens
            assert not (mask & ~kept[layer - 1]).any()


# ---- flags -------------------------------------------------------------------------------------


def test_pmod_flops_counts_pdrop_per_stage(monkeypatch, capsys):
    monkeypatch.setattr(
        "sys.argv",
        ["pmod", "flops", "--model", "llava-1.5-7b", "--method", "pdrop:layers=8/16/24", "--json"],
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    plans = json.loads(capsys.readouterr().out)["plans"]
    pdrop = [plan for plan in plans if plan["method"] == "pdrop"][0]
    kept = [row["kept_vision_tokens"] for row in pdrop["layers"]]
    assert kept == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8


@pytest.mark.parametrize(
    "spec,message",
    [
        ("pdrop:ratio=0", "ratio (lambda) must be in (0, 1], got 0.0"),
        ("pdrop:ratio=1.5", "ratio (lambda) must be in (0, 1], got 1.5"),
        ("pdrop:layers=8/40", "layers 8/40 are out of range for a 32-layer model"),
        ("pdrop:layers=0/8", "layers 0/8 are out of range"),
        ("pdrop:layers=16/8", "must be increasing stage boundaries"),
        ("pdrop:layers=a/b", "separated by '/'"),
        ("pdrop:positions=shift", "unknown pdrop positions 'shift'"),
        ("pdrop:lambda=0.5", "unknown option(s) lambda for method pdrop"),
    ],
)  # fmt: skip
def test_bad_pdrop_settings_end_in_one_error_line(monkeypatch, capsys, spec, message):
    assert message in flops_refusal(monkeypatch, capsys, spec)


def test_a_model_too_shallow_for_the_default_stages_is_refused():
    model, _ = tiny_model("llama", "llava", layers=3)
    with pytest.raises(MethodError, match="need at least 4 layers; give layers="):
        apply_method(model, "pdrop")
    apply_method(model, "pdrop:layers=1/2")  # explicit boundaries fit
    assert model.token_method.boundaries(3) == [1, 2]


@pytest.mark.parametrize("preset,beta", [("llava-1.5-7b", 0.5), ("llava-1.5-7b", 0.3)])
def test_match_tflops_solves_lambda_within_two_percent(preset, beta):
    result = CliRunner().invoke(
        app,
        ["flops", "--model", preset, "--beta", str(beta), "--method", "pdrop", "--match-tflops", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    plans = json.loads(result.output)["plans"]
    pmod, pdrop = plans[0], plans[1]
    assert pdrop["method"] == "pdrop" and pdrop["matched"]
    assert abs(pdrop["tflops"] / pmod["tflops"] - 1) <= 0.02
    settings = make_method("pdrop").settings(576)
    assert [s.ratio for s in settings] == [step / 100 for step in range(1, 100)]
    target = count_flops(get_preset(preset), PMoDConfig(beta=beta).retention_ratios(32)).flops
    assert target == pytest.approx(pmod["tflops"] * 1e12, rel=1e-3)


# ---- training ----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def run_cli(monkeypatch, *argv) -> None:
    monkeypatch.setattr("sys.argv", ["pmod", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)


@pytest.mark.slow
def test_a_recipe_trains_with_pdrop_and_eval_runs_the_checkpoint(tmp_path, monkeypatch):
    """``[train] method = "pdrop"``: the training forward drops vision tokens by the answer-span
    rule (no routers), the checkpoint records the method, and ``pmod eval`` runs it as saved."""
    monkeypatch.chdir(ROOT)
    output = tmp_path / "sft"
    settings = [
        "train.method=pdrop:ratio=0.5",
        "train.max_steps=2",
        f"train.output_dir={output}",
        "model.pretrained_connector=",  # a fresh connector: no pretrain stage needed here
        "train.global_batch_size=4",
        "train.per_device_batch_size=4",
        "train.logging_steps=1",
    ]
    run_cli(monkeypatch, "sft", "recipes/tiny.toml", *sum((["--set", s] for s in settings), []))
    # what the training forward kept, measured by the trainer's routing recorder: the 6-layer
    # model's stages start at layers 1, 3 and 4 and keep 1/2, 1/4, 1/8 of each image's 64 tokens
    summary = json.loads((output / "summary.json").read_text())
    assert summary["kept_ratios"] == {"1": 0.5, "2": 0.5, "3": 0.25, "4": 0.125, "5": 0.125}
    assert summary["flops_ratio"] < 1.0
    config = json.loads((output / "config.json").read_text())
    assert config["pmod_method"] == {
        "name": "pdrop",
        "layers": None,
        "ratio": 0.5,
        "positions": "keep",
    }
    assert set(config["pmod"]["ratios"]) == {1.0}  # no routers: the method says what is kept

    report = tmp_path / "eval.json"
    run_cli(
        monkeypatch,
        "eval", str(output), "--tasks", "pmod_tiny_vqa", "--limit", "4", "--batch-size", "2",
        "--device", "cpu", "--output", str(report),
    )  # fmt: skip
    (run,) = json.loads(report.read_text())["checkpoints"]
    # run as saved: pdrop's stages, in the count and in the KV cache the model filled
    efficiency = run["efficiency"]
    assert efficiency["tflops_vs_dense"] < 0.8 and efficiency["kv_cache_vs_dense"] < 0.8


@pytest.mark.parametrize(
    "setting,message",
    [
        ("train.method=fastv", "train.method = 'fastv': fastv has no training mode; a recipe trains with pmod, pdrop"),
        ("train.method=pdrop:ratio=2", "train.method = 'pdrop:ratio=2': pdrop's ratio (lambda) must be in (0, 1]"),
        ("train.method=zigzag", "unknown method 'zigzag'"),
    ],
)  # fmt: skip
def test_a_recipe_refuses_a_method_it_cannot_train_with(setting, message):
    with pytest.raises(UserError) as refusal:
        load_recipe(ROOT / "recipes" / "tiny.toml", [setting])
    assert message in str(refusal.value) and "\n" not in str(refusal.value)
    with pytest.raises(UserError, match="pmod.enabled = false trains the dense model"):
        load_recipe(ROOT / "recipes" / "tiny.toml", ["train.method=pdrop", "pmod.enabled=false"])
