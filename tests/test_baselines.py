"""Training-free baselines run by the p-MoD layers (FastV, random, pool, dense): what they keep,
against from-scratch computations and the untouched HF model, and their FLOPs and flags."""

from __future__ import annotations

import json

import pytest
import torch
from method_checks import eval_side_by_side
from tiny_models import random_image, randomize_routers, save_checkpoint, tiny_model
from typer.testing import CliRunner

from pmod_cli import (
    apply_dense,
    apply_fastv,
    apply_method,
    apply_pmod,
    apply_pool,
    apply_random,
    record_routing,
)
from pmod_cli.cli import app, main
from pmod_cli.data.prompts import encode
from pmod_cli.efficiency import count_flops, match_method
from pmod_cli.model import MethodError, PMoDConfig, make_method
from pmod_cli.model.methods import cut_image_placeholders, fastv_kept
from pmod_cli.model.presets import get_preset

PROMPTS = [
    "USER: <image>\nwhat colour? ASSISTANT:",
    "USER: <image>\ndescribe the image in one word please ASSISTANT:",
]
METHODS = {
    "fastv": lambda model: apply_fastv(model, layer=2, ratio=0.5),
    "fastv_mean": lambda model: apply_fastv(model, layer=1, ratio=0.3, score="mean"),
    "random": lambda model: apply_random(model, seed=7),
    "dense": apply_dense,
    "pool": lambda model: apply_pool(model, 6),  # 4 x 4 patches -> a 2 x 3 grid
}


def inputs_for(processor, model, indices=(0, 1)):
    """Two images of different sizes, left-padded: what a batch of real prompts looks like."""
    images = [random_image(60, 40, 0), random_image(40, 90, 1)]
    processor.tokenizer.padding_side = "left"
    return encode(processor, [PROMPTS[i] for i in indices], [images[i] for i in indices], model)


def baseline_model(
    method: str, layout: str = "llava", attn: str = "sdpa", pmod_checkpoint: bool = True
):
    model, processor = tiny_model("llama", layout, attn=attn)
    if pmod_checkpoint:  # trained-looking routers that the baselines must not use
        apply_pmod(model, beta=0.5)
        randomize_routers(model)
    METHODS[method](model)
    return model, processor


GENERATE = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("method", ["fastv", "random", "pool"])
def test_eager_and_sdpa_agree(method):
    results = []
    for attn in ("eager", "sdpa"):
        model, processor = baseline_model(method, "llava", attn=attn)
        with torch.no_grad():
            results.append(model.generate(**inputs_for(processor, model), **GENERATE))
    assert torch.equal(results[0].sequences, results[1].sequences)
    for eager, sdpa in zip(results[0].logits, results[1].logits, strict=True):
        assert torch.allclose(eager, sdpa, atol=1e-4)


@pytest.mark.parametrize("score", ["last", "mean"])
def test_fastv_keeps_the_tokens_its_attention_ranking_chooses(score):
    """From scratch: the eager model's attention weights of layer K-1, the last token's row (or
    the mean of the real rows), mean over heads, top round(V * (1 - R)) vision tokens."""
    model, processor = tiny_model("llama", "llava", attn="eager")
    inputs = inputs_for(processor, model)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    layer, ratio = 2, 0.4
    apply_fastv(model, layer=layer, ratio=ratio, score=score)
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
    vision = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    for sample in range(2):
        weights = attentions[layer - 1][sample].float().mean(dim=0)  # (queries, keys)
        received = weights[-1] if score == "last" else weights[real[sample]].mean(dim=0)
        candidates = vision[sample].nonzero().view(-1)
        count = fastv_kept(len(candidates), ratio)
        expected = set(candidates[received[candidates].topk(count).indices].tolist())
        kept = routing.layers[layer].keep_mask[sample] & vision[sample]
        assert set(kept.nonzero().view(-1).tolist()) == expected
        assert torch.equal(
            routing.layers[layer].keep_mask[sample] & ~vision[sample],
            real[sample] & ~vision[sample],
        )


def test_pool_feeds_the_mean_of_each_grid_cell():
    model, processor = tiny_model("llama", "llava")
    inputs = inputs_for(processor, model)
    with torch.no_grad():
        projected = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        ).pooler_output
    apply_pool(model, 4)  # 4 x 4 patches -> 2 x 2 cells of 2 x 2 patches
    pooled = encode(processor, PROMPTS, [random_image(60, 40, 0), random_image(40, 90, 1)], model)
    vision = pooled["input_ids"] == model.config.image_token_id
    assert vision.sum(dim=1).tolist() == [4, 4]
    with torch.no_grad():
        embeds = model(**pooled, output_hidden_states=True).hidden_states[0]  # what enters layer 0
    for sample in range(2):
        grid = projected[sample].view(4, 4, -1)
        expected = torch.stack(
            [grid[r : r + 2, c : c + 2].reshape(4, -1).mean(dim=0) for r in (0, 2) for c in (0, 2)]
        )
        assert torch.allclose(embeds[sample][vision[sample]], expected, atol=1e-5)


def test_pool_placeholders_are_cut_per_image_and_repadded():
    ids = torch.tensor([[0, 0, 5, 9, 9, 9, 9, 6], [5, 9, 9, 9, 9, 6, 9, 9]])  # 9: image; 0: pad
    mask = (ids != 0).long()
    ids[1, 6:] = 9  # the second sample has a second, shorter run
    out = cut_image_placeholders({"input_ids": ids, "attention_mask": mask}, 9, 2, 0, "left")
    assert out["input_ids"].tolist() == [[0, 0, 5, 9, 9, 6], [5, 9, 9, 6, 9, 9]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_a_pool_model_refuses_unpooled_placeholders():
    model, processor = tiny_model("llama", "llava")
    apply_pool(model, 4)
    plain = processor(images=[random_image(60, 40, 0)], text=[PROMPTS[0]], return_tensors="pt")
    with pytest.raises(ValueError, match="runs pool 4 with 4 vision tokens per image"):
        model(**plain)


def test_random_draw_depends_on_the_seed_only():
    model, processor = baseline_model("random", "llava")
    inputs = inputs_for(processor, model)

    def kept(seed):
        apply_random(model, seed=seed)
        with torch.no_grad(), record_routing(model) as routing:
            model(**inputs)
        return [routing.layers[i].keep_mask for i in sorted(routing.layers)]

    first, again, other = kept(1), kept(1), kept(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


# ---- FLOPs -----------------------------------------------------------------------------------


def test_fastv_count_reproduces_the_reference_numbers():
    """LLaVA-1.5-7B, T = 58, K = 2, lm_head over T + V: FastV's R = 0.25 / 0.5 / 0.75 (reference facts)."""
    shape = get_preset("llava-1.5-7b")
    for ratio, tflops in ((0.25, 6.629), (0.5, 4.881), (0.75, 3.132)):
        counted = count_flops(shape, method=make_method("fastv", layer=2, ratio=ratio))
        assert round(counted.tflops, 3) == tflops
        assert counted.baseline_tflops == pytest.approx(8.378, abs=1e-3)
    assert fastv_kept(576, 0.5) == 288 and fastv_kept(576, 0.25) == 432  # round(V * (1 - R))


def test_baseline_counts_follow_their_kept_tokens():
    shape = get_preset("llava-1.5-7b")
    ratios = PMoDConfig().retention_ratios(32)
    pmod = count_flops(shape, ratios)
    random = count_flops(shape, ratios, method=make_method("random"))
    assert pmod.flops - random.flops == pmod.components["routers"]  # the same budget, no router
    pool = count_flops(shape, ratios, method=make_method("pool", tokens=144))
    d = shape.text.hidden_size
    assert (
        pool.components["lm_head"] == 2 * (58 + 144) * d * shape.text.vocab_size
    )  # a shorter prompt
    assert pool.layers[5].tokens == 58 + 144 and pool.kv_cache_ratio == pytest.approx(0.25)
    dense = count_flops(shape, ratios, method=make_method("dense"))
    assert dense.flops == dense.baseline_flops


@pytest.mark.parametrize("method", ["fastv", "pool"])
@pytest.mark.parametrize(
    "preset,beta", [("llava-1.5-7b", 0.5), ("llava-1.5-7b", 0.3), ("llava-1.5-13b", 0.5)]
)
def test_match_tflops_lands_within_two_percent(method, preset, beta):
    result = CliRunner().invoke(
        app,
        ["flops", "--model", preset, "--beta", str(beta), "--method", method, "--match-tflops", "--json",
         "--text-tokens", "40", "--vision-tokens", "256"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    plans = json.loads(result.output)["plans"]
    pmod, baseline = plans[0], plans[1]
    assert baseline["method"] == method and baseline["matched"]
    assert abs(baseline["tflops"] / pmod["tflops"] - 1) <= 0.02


def test_match_method_picks_the_closest_setting():
    shape = get_preset("llava-1.5-7b")
    ratios = PMoDConfig().retention_ratios(32)
    target = count_flops(shape, ratios).flops
    matched = match_method(shape, ratios, make_method("fastv"), target)
    kept = fastv_kept(576, matched.ratio)
    for neighbour in (kept - 1, kept + 1):
        other = make_method("fastv", ratio=1 - neighbour / 576)
        assert abs(count_flops(shape, ratios, method=other).flops - target) >= abs(
            count_flops(shape, ratios, method=matched).flops - target
        )


@pytest.mark.slow
def test_pmod_eval_runs_every_method_side_by_side(tmp_path):
    model, processor = tiny_model("llama", "llava", layers=4)
    apply_pmod(model, beta=0.5)
    randomize_routers(model)
    checkpoint = save_checkpoint(model, processor, tmp_path / "pmod")
    runs, printed = eval_side_by_side(
        checkpoint, tmp_path / "eval.json", "pmod,dense,fastv,random,pool", "--match-tflops"
    )
    assert list(runs) == ["pmod", "dense", "fastv", "random", "pool"]
    assert runs["pool"]["label"] == f"pmod: pool {runs['pool']['method']['tokens']}"
    assert (
        runs["fastv"]["matched_at"]["vision_tokens"] == 16 and runs["random"]["matched_at"] is None
    )
    for name, run in runs.items():
        efficiency = run["efficiency"]
        assert efficiency["mean_vision_tokens"] == 16  # the image's V, before any pooling
        assert run["label"].split(": ")[1].split()[0] in printed
        for measurement in run["measurements"]:
            # the dense twin caches T + V in each of the 4 layers, pooled or not
            entry = measurement["dense_kv_cache_bytes"] // (4 * (measurement["text_tokens"] + 16))
            assert (
                measurement["dense_kv_cache_bytes"] == 4 * (measurement["text_tokens"] + 16) * entry
            )
            if name == "dense":
                assert measurement["kv_cache_bytes"] == measurement["dense_kv_cache_bytes"]
            if name == "pool":
                pooled = run["method"]["tokens"]
                assert (
                    measurement["kv_cache_bytes"]
                    == 4 * (measurement["text_tokens"] + pooled) * entry
                )
    assert runs["dense"]["efficiency"]["tflops_vs_dense"] == 1.0
    assert runs["fastv"]["efficiency"]["tflops"] < runs["dense"]["efficiency"]["tflops"]


# ---- bad settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--method", "fastv:layer=40"], "layer K=40 is out of range for a 32-layer model"),
        (["--method", "fastv:layer=0"], "must be at least 1"),
        (["--method", "fastv:ratio=0"], "in (0, 1]; got 0.0"),
        (["--method", "fastv:ratio=1.2"], "in (0, 1]; got 1.2"),
        (["--method", "fastv:ratio=half"], "fastv's option ratio takes float, got 'half'"),
        (
            ["--method", "fastv:K=2"],
            "unknown option(s) K for method fastv (its options: layer, ratio",
        ),
        (["--method", "fastv:layer"], "option 'layer' is not key=value"),
        (["--method", "ratio=0.5,fastv"], "option 'ratio=0.5' comes before any method"),
        (["--method", "pool:tokens=577"], "between 1 and the 576 vision tokens"),
        (["--method", "pool"], "pool needs tokens=N (pool:tokens=64) or --match-tflops"),
        (
            ["--method", "zigzag"],
            "unknown method 'zigzag'; choose one of pmod, dense, fastv, random, pool",
        ),
        (
            ["--method", "fastv:ratio=0.5", "--match-tflops"],
            "chooses fastv's ratio itself; drop ratio=",
        ),
        (
            ["--method", "random", "--match-tflops"],
            "--match-tflops solves a method's knob: add one of fastv, pool",
        ),
    ],
)
def test_bad_flops_settings_end_in_one_error_line(monkeypatch, capsys, arguments, message):
    monkeypatch.setattr("sys.argv", ["pmod", "flops", "--model", "llava-1.5-7b", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_bad_eval_settings_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    model, processor = tiny_model("llama", "llava", layers=4)
    save_checkpoint(model, processor, tmp_path / "dense")
    capsys.readouterr()  # the save's progress bar
    for arguments, message in (
        (["--method", "fastv:layer=4"], "out of range for a 4-layer model"),
        (["--method", "pool:tokens=17"], "between 1 and the 16 vision tokens"),
        (["--method", "pmod"], "dense checkpoint: it has no trained routers"),
    ):
        monkeypatch.setattr(
            "sys.argv",
            ["pmod", "eval", str(tmp_path / "dense"), "--tasks", "pmod_tiny_vqa", *arguments],
        )
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err


def test_methods_refuse_settings_the_model_cannot_run():
    model, _ = tiny_model("llama", "llava_next", layers=4)
    with pytest.raises(MethodError, match="out of range"):
        apply_fastv(model, layer=4)
    with pytest.raises(MethodError, match="not one grid"):
        apply_pool(model, 4)
    llava, _ = tiny_model("llama", "llava", layers=4)
    with pytest.raises(MethodError, match="do not tile"):
        apply_pool(llava, 11)  # 1 x 11: wider than the 4 x 4 grid
    with pytest.raises(MethodError, match="unknown method"):
        apply_method(llava, "zigzag")
    with pytest.raises(MethodError, match="between 1 and the 16"):
        apply_pool(llava, 17)
