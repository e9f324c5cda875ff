"""SparseVLM (``sparsevlm``): the official v1.5 counts, the kept sets and recycled states against an
independent derivation of the official rule from HF's own eager attention, the clustering against
a brute-force DPC-kNN, attention backends, caching and batching, refusals and --match-tflops."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from method_checks import (
    assert_backends_keep_alike,
    assert_cached_uncached_and_alone_agree,
    capture_layer_inputs,
    eager_row_attention,
    flops_refusal,
    kept_masks,
    method_model,
    vision_of,
)
from tiny_models import random_image, random_video, tiny_model
from typer.testing import CliRunner

from pmod_cli import apply_method
from pmod_cli.cli import app
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.model import MethodError, make_method
from pmod_cli.model.methods import parse_method
from pmod_cli.model.methods.sparsevlm import cluster_and_merge

BUILDERS = {
    "llava": lambda **options: tiny_model("llama", "llava", **options),  # 16 vision tokens
    "llava_next-qwen2": lambda **options: tiny_model("qwen2", "next", **options),  # 44 and 88, GQA
    "qwen2_5_vl": lambda **options: tiny_model(layout="qwen2_5_vl", **options),
}
SAMPLES = [
    ("what colour?", [random_image(60, 40, 0)]),
    ("describe the picture please", [random_image(200, 190, 2)]),
]


def batch(model, processor, indices=(0, 1)) -> dict:
    """Left-padded prompts of the family, one image each (of two sizes)."""
    processor.tokenizer.padding_side = "left"
    rows = [SAMPLES[i] for i in indices]
    prompts = [build_prompt(processor, question, len(images)) for question, images in rows]
    return encode(processor, prompts, [images for _, images in rows], model)


def sparsevlm_model(family: str, spec: str = "sparsevlm", **options):
    return method_model(BUILDERS[family], spec, **options)


# ---- the plan ----------------------------------------------------------------------------------


def test_the_official_v1_5_plan_on_llava_1_5():
    """576 tokens, budget 192: 300 + 9, 200 + 4, 110 + 3 after layers 2, 6 and 15 (the spec's
    worked numbers: n = int(0.3 * pruned) + 1 recycled into int(n / 10) + 1 clusters)."""
    method = make_method("sparsevlm")
    assert method.sparse_layers(32) == [2, 6, 15]
    assert method.stages(576, 32) == [(300, 9), (200, 4), (110, 3)]
    kept = method.kept_vision_tokens([1.0] * 32, 576)
    assert kept == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    assert method.layer_modes([1.0] * 32) == ["dense"] * 2 + ["subset"] * 30
    assert make_method("sparsevlm", budget=64).counts(576) == [66, 30, 17]
    assert make_method("sparsevlm", recycle=False).stages(576, 32) == [(300, 0), (200, 0), (110, 0)]
    # shallower models: 2/6/15 of 32 scaled down, each layer above the one before
    assert method.sparse_layers(4) == [0, 1, 2] and method.sparse_layers(28) == [1, 5, 13]
    # counts scale with V; never all of the present tokens
    assert method.counts(288) == [150, 100, 55]
    assert make_method("sparsevlm", scale=4).stages(10, 32)[0][0] == 9


# ---- the rule ----------------------------------------------------------------------------------


def brute_force_dpc(points: torch.Tensor, clusters: int) -> tuple[list[int], torch.Tensor]:
    """DPC-kNN written out point by point: (centre rows, each cluster's average)."""
    n, width = points.shape
    dist = [
        [float((points[i] - points[j]).norm()) / math.sqrt(width) for j in range(n)]
        for i in range(n)
    ]
    density = [math.exp(-sum(x * x for x in sorted(row)[:clusters]) / clusters) for row in dist]
    largest = max(max(row) for row in dist)
    score = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i]]
        score.append((min(denser) if denser else largest) * density[i])
    centres = sorted(range(n), key=lambda i: -score[i])[:clusters]
    members = {c: [] for c in centres}
    for i in range(n):
        owner = i if i in members else min(centres, key=lambda c: dist[c][i])
        members[owner].append(i)
    merged = torch.stack([points[members[c]].sum(0) / (len(members[c]) + 1e-6) for c in centres])
    return centres, merged


def test_clustering_equals_brute_force_and_finds_separated_groups():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(37, 8, generator=generator)
    centre, merged = cluster_and_merge(points, 4)
    expected_centres, expected_merged = brute_force_dpc(points, 4)
    assert centre.tolist() == expected_centres
    assert torch.allclose(merged, expected_merged, atol=1e-5)
    # three far-apart groups: three clusters, each the mean of its group
    offsets = torch.tensor([[0.0] * 8, [50.0] * 8, [-50.0] * 8])
    groups = [offsets[g] + 0.1 * torch.randn(6, 8, generator=generator) for g in range(3)]
    centre, merged = cluster_and_merge(torch.cat(groups), 3)
    means = torch.stack([group.mean(0) for group in groups])
    found = sorted(merged.tolist(), key=lambda row: row[0])
    assert torch.allclose(torch.tensor(found), means[[2, 0, 1]], atol=1e-4)


def official_rule(model, inputs, captured, method):
    """Per sparse layer l: (the tokens layers l+1.. keep, {slot: recycled state}), derived from
    scratch: the raters from the embeddings, layer l's eager attention over the present tokens
    (HF's own module on the compacted sequence) ranking them, the best-rated pruned ones
    clustered by brute force on layer l's output. A recycled state sits in its centre's slot."""
    vision = vision_of(model, inputs)
    valid = inputs["attention_mask"].bool()
    bounds = method.sparse_layers(len(model.decoder_layers))
    raters = []
    for sample in range(valid.shape[0]):
        last = int(vision[sample].nonzero().max())
        text = [i for i in range(last + 1, valid.shape[1]) if valid[sample, i]]
        embeddings = captured[0][0][sample]
        share = (embeddings[vision[sample]] @ embeddings[text].T).softmax(-1).mean(0)
        raters.append({text[i] for i in range(len(text)) if share[i] > share.mean()})
    present, merges, expected = valid.clone(), {}, {}
    for stage, layer in enumerate(bounds):
        hidden, (cos, sin) = captured[layer]
        hidden = hidden.clone()
        for (sample, slot), state in merges.items():  # recycled into the layer's input
            if bounds[stage - 1] == layer - 1:
                hidden[sample, slot] = state
        keep, merges = valid & ~vision, {}
        for sample in range(hidden.shape[0]):
            index = present[sample].nonzero().view(-1)
            rows = [i for i, slot in enumerate(index.tolist()) if slot in raters[sample]]
            received = eager_row_attention(
                model.decoder_layers[layer],
                hidden[sample, index][None],
                cos[min(sample, cos.shape[0] - 1), index][None],
                sin[min(sample, sin.shape[0] - 1), index][None],
                rows,
            )
            in_vision = vision[sample][index]
            slots, scores = index[in_vision], received[in_vision].detach()
            count = min(method.counts(int(vision[sample].sum()))[stage], len(slots) - 1)
            top = scores.topk(count).indices
            keep[sample, slots[top]] = True
            pruned = [i for i in range(len(slots)) if i not in set(top.tolist())]
            best = sorted(pruned, key=lambda i: -float(scores[i]))[: int(len(pruned) * 0.3) + 1]
            output = captured[layer + 1][0][sample, slots[best]]
            centres, merged = brute_force_dpc(output, int(len(best) / 10) + 1)
            for centre, state in zip(centres, merged, strict=True):
                slot = int(slots[best[centre]])
                keep[sample, slot] = True
                merges[(sample, slot)] = state
        expected[layer], present = (keep, dict(merges)), keep
    return expected


@pytest.mark.parametrize("family", ["llava", "llava_next-qwen2"])
@pytest.mark.parametrize("spec", ["sparsevlm", "sparsevlm:layers=1/2,scale=0.3"])
def test_kept_sets_and_recycled_states_equal_the_official_rule(family, spec):
    model, processor = sparsevlm_model(family, spec, attn="eager")
    inputs = batch(model, processor)
    method = model.token_method
    captured, hooks = capture_layer_inputs(model, range(4))
    gathered = {}  # what each layer's attention ran on: the kept slots' states, in order

    def gather(index, module, args, output) -> None:  # the last call: after a ranking's own
        gathered[index] = args[0].detach().clone()

    for index, layer in enumerate(model.decoder_layers):
        hooks.append(layer.input_layernorm.register_forward_hook(partial(gather, index)))
    _, kept = kept_masks(model, inputs)
    for hook in hooks:
        hook.remove()
    expected = official_rule(model, inputs, captured, method)
    bounds = method.sparse_layers(4)
    for layer, mask in kept.items():
        earlier = [b for b in bounds if b < layer]
        if not earlier:
            assert torch.equal(mask, inputs["attention_mask"].bool()), layer
            continue
        keep, merges = expected[earlier[-1]]
        assert torch.equal(mask, keep), (layer, earlier[-1])
        if layer == earlier[-1] + 1:  # the layer right after: the recycled states in its input
            assert merges
            for (sample, slot), state in merges.items():
                row = int(mask[sample, :slot].sum())  # the slot's place among the kept ones
                assert torch.allclose(gathered[layer][sample, row], state, atol=1e-5)
    assert sorted(kept) == list(range(bounds[0], 4))


# ---- backends, caching, batching ---------------------------------------------------------------


def test_eager_sdpa_and_flash_attention_keep_the_same_tokens(monkeypatch):
    model, processor = sparsevlm_model("llava_next-qwen2", "sparsevlm:scale=0.5", attn="eager")
    assert_backends_keep_alike(model, batch(model, processor), monkeypatch)


@pytest.mark.parametrize("family", ["llava_next-qwen2", "qwen2_5_vl"])
def test_cached_equals_uncached_and_alone_equals_batched(family):
    model, processor = sparsevlm_model(family, "sparsevlm:scale=0.5")
    inputs = batch(model, processor)
    assert_cached_uncached_and_alone_agree(
        model, inputs, lambda row: batch(model, processor, [row])
    )


# ---- refusals, flags, --match-tflops -----------------------------------------------------------


def test_two_images_in_a_sample_and_video_are_refused_in_one_line():
    model, processor = sparsevlm_model("llava")
    prompt = build_prompt(processor, "compare", 2)
    inputs = encode(
        processor, [prompt], [[random_image(60, 40, 0), random_image(40, 60, 1)]], model
    )
    with pytest.raises(MethodError, match="sparsevlm chooses within one image per sample"):
        model(**inputs)
    model, processor = tiny_model("qwen2", "onevision")
    apply_method(model, "sparsevlm")
    prompt = build_prompt(processor, "what happens?", 0, num_videos=1)
    inputs = encode(processor, [prompt], [[]], model, videos=[random_video(4, 64, 96, 3)])
    with pytest.raises(MethodError, match="video inputs are not supported"):
        model(**inputs)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("sparsevlm:budget=100", "sparsevlm's budget is one of 192, 128, 96, 64; got 100"),
        ("sparsevlm:scale=0", "sparsevlm's scale must be above 0"),
        ("sparsevlm:layers=6/2", "sparsevlm's layers are one to three increasing layers"),
        ("sparsevlm:layers=2/31", "do not fit a 32-layer model"),
    ],
)
def test_bad_settings_end_in_one_error_line(monkeypatch, capsys, spec, message):
    assert message in flops_refusal(monkeypatch, capsys, spec)


def test_match_tflops_solves_the_scale_and_the_count_follows_the_plan():
    result = CliRunner().invoke(
        app,
        [
            "flops",
            "--model",
            "llava-1.5-7b",
            "--method",
            "pmod,sparsevlm",
            "--match-tflops",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    plans = json.loads(result.output)["plans"]
    pmod, sparse = plans[0], plans[1]
    assert sparse["method_settings"]["name"] == "sparsevlm"
    assert abs(sparse["tflops"] / pmod["tflops"] - 1) < 0.02
    scale = sparse["method_settings"]["scale"]
    method = parse_method(f"sparsevlm:scale={scale}")
    assert [row["tokens"] for row in sparse["layers"]] == [
        58 + n for n in method.kept_vision_tokens([1.0] * 32, 576)
    ]
