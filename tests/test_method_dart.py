"""DART (``dart``): the kept set against an independent derivation of the official rule (keys
from the KV cache, layer K-1's output from a forward hook, on eager models), the count against
torch's FLOP counter, every attention backend, cached == uncached, alone == batched, the families
it runs on and its refusals, ``pmod flops`` / ``pmod eval --method dart``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from flash_attn_cpu import install as install_flash_attention
from flop_counting import counted_flops, prefill_flops
from method_checks import cli_refusal, eval_side_by_side
from tiny_models import random_image, random_video, save_checkpoint, tiny_model
from typer.testing import CliRunner

from pmod_cli import apply_method, record_routing
from pmod_cli.cli import app, main
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.efficiency import count_flops
from pmod_cli.model import MethodError, make_method
from pmod_cli.model.cache import kv_cache_lengths
from pmod_cli.model.families import family_for_model
from pmod_cli.model.presets import get_preset

K = 2
SPEC = "dart:ratio=0.4,image_pivots=2,text_pivots=2"  # the tiny images' V of 8 to 80 keep some
BUILDERS = {
    "llava": lambda attn="eager": tiny_model("llama", "llava", attn=attn),
    "llava_next": lambda attn="eager": tiny_model("llama", "next", attn=attn),
    "llava_onevision": lambda attn="eager": tiny_model("qwen2", "onevision", attn=attn),
    "qwen2_5_vl": lambda attn="eager": tiny_model(layout="qwen2_5_vl", attn=attn),
}
QUESTIONS = ["what colour?", "describe the image in one word please"]
GENERATE = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)


def images():
    return [random_image(112, 84, 0), random_image(56, 112, 1)]


def batch(model, processor, indices=(0, 1)) -> dict:
    """One image per sample, images of two sizes, left-padded."""
    processor.tokenizer.padding_side = "left"
    prompts = [build_prompt(processor, QUESTIONS[i]) for i in indices]
    return encode(processor, prompts, [images()[i] for i in indices], model)


def vision_of(model, inputs) -> torch.Tensor:
    return family_for_model(model).vision_mask(inputs["input_ids"], model.config)


def kept_sets(model, inputs) -> list[set[int]]:
    """Per sample: the vision tokens layer K processes (as positions of the padded batch)."""
    return forward(model, inputs)[0]


def forward(model, inputs) -> tuple[list[set[int]], torch.Tensor]:
    """The kept vision tokens of each sample (``kept_sets``) and the logits of one forward pass."""
    with torch.no_grad(), record_routing(model) as routing:
        logits = model(**inputs).logits
    decision = routing.layers[K]
    kept = decision.keep_mask & decision.vision_mask
    for later in range(K + 1, len(model.retention_ratios)):  # one set for every later layer
        assert torch.equal(routing.layers[later].keep_mask, decision.keep_mask)
    real = inputs["attention_mask"].bool()
    assert torch.equal(decision.keep_mask & ~decision.vision_mask, real & ~decision.vision_mask)
    return [set(row.nonzero().view(-1).tolist()) for row in kept], logits


# ---- the rule, derived from scratch -----------------------------------------------------------


def official_choice(keys, states, start, length, image_pivots, text_pivots, picks) -> set[int]:
    """The official ``get_retained_image_token`` on one unpadded sample: ``keys`` (seq, kv_dim)
    after RoPE, ``states`` (seq, hidden) under the final norm; the image span [start, start +
    length). The pivots take their turns in ascending position (pmod's order for the set)."""
    image_norms = torch.norm(keys[start : start + length], p=1, dim=-1)
    text_norms = torch.norm(keys[start + length :], p=1, dim=-1)
    image_indices = (image_norms.topk(image_pivots).indices + start).tolist()
    text_indices = (text_norms.topk(text_pivots).indices + start + length).tolist()
    indices = set(image_indices + text_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    for item in sorted(indices):
        valid_list = sorted(valid)
        similarity = -F.cosine_similarity(states[item], states[valid_list], dim=-1)
        picked = [valid_list[i] for i in similarity.topk(picks).indices.tolist()]
        indices.update(picked)
        valid.difference_update(picked)
    return indices - set(text_indices)


def captured(model, inputs):
    """Layer K-1's keys after RoPE (from the KV cache) and output (a forward hook), dense model."""
    store = {}
    layer = family_for_model(model).decoder_layers(model)[K - 1]
    hook = layer.register_forward_hook(lambda m, a, out: store.update(out=out))
    try:
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).past_key_values
    finally:
        hook.remove()
    keys = cache.layers[K - 1].keys  # (batch, kv_heads, seq, head_dim)
    output = store["out"][0] if isinstance(store["out"], tuple) else store["out"]
    with torch.no_grad():
        normed = model.model.language_model.norm(output).float()
    return keys.permute(0, 2, 1, 3).flatten(2).float(), normed


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_dart_keeps_what_the_official_rule_chooses(family):
    model, processor = BUILDERS[family]()
    norm = model.model.language_model.norm  # weights of 1 would leave every cosine unchanged
    norm.weight.data = torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(3))
    inputs = batch(model, processor)
    keys, normed = captured(model, inputs)
    ratio, image_pivots, text_pivots = 0.4, 2, 2
    apply_method(model, SPEC)
    kept = kept_sets(model, inputs)
    vision = vision_of(model, inputs)
    for sample, real in enumerate(inputs["attention_mask"].bool()):
        pad = int((~real).sum())  # left padding: the sample's tokens start there
        image = vision[sample][real].nonzero().view(-1)
        start, length = int(image[0]), len(image)
        picks = int(length * (1 - ratio) // (image_pivots + text_pivots))  # the official TOKEN_TOPK
        expected = official_choice(
            keys[sample][real], normed[sample][real], start, length, 2, 2, picks
        )
        assert len(expected) == 2 + 4 * picks == model.token_method.kept(length) < length
        assert kept[sample] == {pad + index for index in expected}, (family, sample)


def test_budgets_follow_the_official_settings():
    llava = make_method("dart", max_tokens=128)  # LLaVA-1.5's scripts: max_num_trunction 128
    assert llava.picks_per_pivot(576) == 16 and llava.kept(576) == 132
    assert make_method("dart").kept(576) == 4 + 8 * 15  # R = 0.778: floor(127.87 / 8) = 15
    next_ = make_method("dart", max_tokens=320)  # LLaVA-NeXT: retain_token_num_for_llava_next
    assert next_.kept(2880) == 324
    # MAX is capped at V - p_img, so the candidates never run out (the official code fails there)
    assert make_method("dart", max_tokens=128).kept(40) == 4 + 8 * 4
    assert make_method("dart", ratio=0.0).kept(12) == 4 + 8 * 1
    assert make_method("dart").kept(3) == 3 and make_method("dart").kept(0) == 0


def test_the_turns_cycle_over_the_pivots_when_text_is_short():
    """Fewer text tokens after the image than p_txt: the turns go round the pivots there are,
    so the count stays p_img + (p_img + p_txt) * TOKEN_TOPK."""
    from pmod_cli.model.methods.dart import dart_choice

    generator = torch.Generator().manual_seed(0)
    normed = torch.randn(1, 12, 8, generator=generator)
    image = torch.zeros(1, 12, dtype=torch.bool)
    image[0, 1:11] = True  # one text token before, one after
    text = ~image
    text[0, 0] = False
    norms = torch.rand(1, 12, generator=generator)
    chosen = dart_choice(norms, normed, image, text, 1, 3, torch.tensor([2]))
    assert int(chosen.sum()) == 1 + 4 * 2 and not (chosen & ~image).any()


# ---- FLOPs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_flop_counter_on_a_real_prefill_equals_the_count(family):
    """The language model's linear layers and lm_head (the paper count) and its eager attention
    products (the full count) as torch's FLOP counter sees them; DART's own choice adds no
    matmul. The caches hold T + the kept vision tokens."""
    model, processor = BUILDERS[family]()
    apply_method(model, SPEC)
    inputs = batch(model, processor, (0,))
    measured = prefill_flops(model, inputs)
    vision = int(vision_of(model, inputs).sum())
    text = inputs["input_ids"].shape[1] - vision
    paper, full = counted_flops(model, vision, text)
    assert measured.linear == paper.flops
    assert measured.attention == full.components["attention_products"]
    kept = model.token_method.kept(vision)
    assert [row.tokens for row in full.layers][K:] == [text + kept] * 2
    assert measured.cache_lengths == [[row.tokens] for row in full.layers]


def test_ranking_flops_count_the_key_norms_and_cosines():
    shape = get_preset("llava-1.5-7b")
    d, kv = shape.text.hidden_size, shape.text.kv_dim
    flops = make_method("dart").ranking_flops(shape, 576, 58)
    assert flops == (576 + 58) * (5 * kv + 4 * d + 6 * 8 * d)
    assert flops < 1e-4 * count_flops(shape, method=make_method("dart")).flops


# ---- backends, caching, batching, families ----------------------------------------------------


def test_eager_sdpa_and_flash_attention_keep_the_same_tokens(monkeypatch):
    runs = []
    for attn in ("eager", "sdpa"):
        model, processor = BUILDERS["llava_next"](attn)
        apply_method(model, SPEC)
        runs.append((model, processor))
    install_flash_attention(monkeypatch)
    flash = copy.deepcopy(runs[1][0])
    flash.set_attn_implementation("flash_attention_2")
    runs.append((flash, runs[1][1]))
    inputs = batch(*runs[0])
    real = inputs["attention_mask"].bool()
    results = [forward(model, inputs) for model, _ in runs]
    for kept, logits in results[1:]:
        assert kept == results[0][0]
        assert torch.allclose(logits[real], results[0][1][real], atol=1e-4)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_cached_equals_uncached_and_alone_equals_batched(family):
    model, processor = BUILDERS[family]("sdpa")
    apply_method(model, SPEC)
    inputs = batch(model, processor)
    suppress = [getattr(model.config, key) for key in family_for_model(model).media_tokens]
    with torch.no_grad():
        cached = model.generate(**inputs, suppress_tokens=suppress, **GENERATE)
        uncached = model.generate(**inputs, use_cache=False, suppress_tokens=suppress, **GENERATE)
        alone = [
            model.generate(**batch(model, processor, (i,)), suppress_tokens=suppress, **GENERATE)
            for i in (0, 1)
        ]
    assert torch.equal(cached.sequences, uncached.sequences)
    for index, single in enumerate(alone):
        assert torch.equal(single.sequences[0, -3:], cached.sequences[index, -3:])
        for a, b, c in zip(cached.logits, uncached.logits, single.logits, strict=True):
            assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a[index], c[0], atol=1e-4)
    # each layer from K on caches the text and the kept vision tokens (+ the generated ones)
    vision = vision_of(model, inputs).sum(dim=1).tolist()
    text = (inputs["attention_mask"].sum(dim=1) - torch.tensor(vision)).tolist()
    lengths = kv_cache_lengths(cached.past_key_values)
    for layer in range(K, len(lengths)):
        kept = [model.token_method.kept(v) for v in vision]
        assert lengths[layer] == [t + k + 2 for t, k in zip(text, kept, strict=True)]


# ---- refusals ---------------------------------------------------------------------------------


def test_refusals_are_one_line():
    qwen3, _ = tiny_model(layout="qwen3_vl")
    with pytest.raises(MethodError) as refusal:
        apply_method(qwen3, "dart")
    assert "Qwen3-VL" in str(refusal.value) and "\n" not in str(refusal.value)
    model, processor = BUILDERS["llava"]("sdpa")
    apply_method(model, SPEC)
    processor.tokenizer.padding_side = "left"
    two = encode(processor, [build_prompt(processor, "compare", 2)], [images()], model)
    with pytest.raises(MethodError, match="a sample here has 2 images"):
        model(**two)
    with pytest.raises(MethodError, match="out of range for a 4-layer model"):
        apply_method(model, "dart:layer=4")


def test_pmod_eval_refuses_a_family_in_one_line(tmp_path, monkeypatch, capsys):
    model, processor = tiny_model(layout="qwen3_vl")
    save_checkpoint(model, processor, tmp_path / "qwen3")
    command = ["eval", str(tmp_path / "qwen3"), "--tasks", "pmod_tiny_vqa", "--method", "dart"]
    err = cli_refusal(monkeypatch, capsys, *command)
    assert err.startswith("error: dart does not run on Qwen3-VL"), err


def test_video_is_refused():
    model, processor = BUILDERS["qwen2_5_vl"]("sdpa")
    apply_method(model, SPEC)
    prompt = build_prompt(processor, "what happens?", 0, num_videos=1)
    inputs = encode(processor, [prompt], [], model, videos=[random_video(4, 64, 96, 3)])
    with pytest.raises(MethodError, match="video inputs are not supported"):
        model.generate(**inputs, max_new_tokens=1)


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--method", "dart:layer=0"], "must be at least 1"),
        (["--method", "dart:layer=32"], "layer K=32 is out of range for a 32-layer model"),
        (["--method", "dart:ratio=1.5"], "in [0, 1]; got 1.5"),
        (["--method", "dart:image_pivots=0"], "image_pivots >= 1"),
        (["--method", "dart:max_tokens=128", "--match-tflops"], "drop max_tokens="),
        (["--method", "dart:ratio=0.5", "--match-tflops"], "chooses dart's ratio itself"),
    ],
)
def test_bad_settings_end_in_one_error_line(monkeypatch, capsys, arguments, message):
    monkeypatch.setattr("sys.argv", ["pmod", "flops", "--model", "llava-1.5-7b", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and "\n" not in err and message in err, err


# ---- the commands ----------------------------------------------------------------------------


def test_pmod_flops_counts_dart_and_matches_tflops():
    runner = CliRunner()
    result = runner.invoke(app, ["flops", "--model", "llava-1.5-7b", "--method", "dart", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["plans"][-1]
    assert plan["method"] == "dart"
    expected = count_flops(get_preset("llava-1.5-7b"), method=make_method("dart"))
    assert plan["tflops"] == pytest.approx(expected.tflops, abs=1e-3)
    result = runner.invoke(
        app,
        ["flops", "--model", "llava-1.5-7b", "--beta", "0.5", "--method", "dart", "--match-tflops",
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pmod, dart = json.loads(result.output)["plans"][:2]
    assert dart["method"] == "dart" and dart["matched"]
    assert abs(dart["tflops"] / pmod["tflops"] - 1) <= 0.02


def test_settings_give_every_picks_count_once():
    settings = make_method("dart").settings(576)
    kept = [setting.kept(576) for setting in settings]
    assert kept == [4 + 8 * picks for picks in range(len(settings))] and kept[-1] == 572


@pytest.mark.slow
def test_pmod_eval_runs_dart(tmp_path):
    model, processor = tiny_model("llama", "llava", layers=4)
    checkpoint = save_checkpoint(model, processor, tmp_path / "dense")
    runs, _ = eval_side_by_side(checkpoint, tmp_path / "eval.json", "dense,dart:ratio=0.5")
    assert runs["dart"]["method"]["ratio"] == 0.5
    dense, dart = runs["dense"]["efficiency"], runs["dart"]["efficiency"]
    assert dart["tflops"] < dense["tflops"] and dart["mean_vision_tokens"] == 16
