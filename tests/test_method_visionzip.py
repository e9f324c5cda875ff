"""VisionZip (``visionzip``): the tokens that enter the language model against VisionZip's rule
written out from the eager tower's attention probabilities, keys and hidden states; its FLOPs
count against torch's FLOP counter; backends, caching, batching, families and flags."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from flash_attn_cpu import install
from flop_counting import counted_flops, prefill_flops
from method_checks import assert_backends_keep_alike, cli_refusal, eval_side_by_side
from tiny_models import random_image, randomize_routers, save_checkpoint, tiny_model
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    apply_rotary_pos_emb_vision,
    get_vision_window_index,
)
from typer.testing import CliRunner

from pmod_cli import apply_method, apply_pmod, record_routing
from pmod_cli.cli import app, main
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.efficiency import count_flops
from pmod_cli.evaluation.measure import SampleMeasurement
from pmod_cli.evaluation.run import _mean_crops, check_method_fits
from pmod_cli.model import MethodError, make_method
from pmod_cli.model.methods import method_from_dict
from pmod_cli.model.methods.visionzip import zip_crops
from pmod_cli.model.presets import shape_from_hf_config

PROMPTS = [
    "USER: <image>\nwhat colour? ASSISTANT:",
    "USER: <image>\ndescribe the image in one word please ASSISTANT:",
]
SPEC = "visionzip:dominant=6,contextual=3"  # of a crop's 17 tower tokens (CLS + 4 x 4 patches)
DOMINANT, CONTEXTUAL = 6, 3


def images():
    return [random_image(60, 40, 0), random_image(40, 90, 1)]


def zipped(layout: str = "llava", attn: str = "sdpa", spec: str = SPEC):
    model, processor = tiny_model("llama", layout, attn=attn)
    apply_method(model, spec)
    processor.tokenizer.padding_side = "left"
    return model, processor


def entering_vision(model, inputs) -> list[torch.Tensor]:
    """Per sample, the vision rows of the embeddings that enter layer 0."""
    with torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0]
    vision = inputs["input_ids"] == model.config.image_token_id
    return [embeds[sample][vision[sample]] for sample in range(len(embeds))]


# ---- the rule, written out --------------------------------------------------------------------


def tower_internals(model, pixel_values):
    """The eager tower's feature-layer output (crops, N, width), attention probabilities
    (crops, heads, N, N) and k_proj output (crops, N, width), captured with a hook."""
    config = model.config
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    index = config.vision_feature_layer % (len(layers) + 1)
    captured = {}
    hook = layers[index - 1].self_attn.k_proj.register_forward_hook(
        lambda module, args, output: captured.update(keys=output)
    )
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    return out.hidden_states[index], out.attentions[index - 1], captured["keys"]


def reference_crop(hidden, attention, keys, heads, dominant, contextual):
    """VisionZip on one crop, token by token (``clip_encoder.py``): (D + C, width) tokens and the
    sorted indices of the dominant ones."""
    n = hidden.shape[0]
    cls_scores = attention[:, 0, 1:].sum(dim=0)  # the CLS row, summed over heads
    ranked = sorted(range(1, n), key=lambda i: -float(cls_scores[i - 1]))
    kept = sorted([0, *ranked[: dominant - 1]])
    rest = [i for i in range(n) if i not in kept]
    metric = keys.view(n, heads, -1).mean(dim=1)  # head-mean keys
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // contextual)
    targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
    assigned = {target: [] for target in targets}
    for i in rest:
        if i not in assigned:
            similarity = [float(metric[i] @ metric[target]) for target in targets]
            assigned[targets[similarity.index(max(similarity))]].append(i)
    tokens = [hidden[i] for i in kept]
    for target in targets:
        members = assigned[target]
        mean = torch.stack([hidden[i] for i in members]).mean(dim=0) if members else 0
        tokens.append(hidden[target] + mean)
    return torch.stack(tokens), kept


def reference_crops(model, pixel_values):
    """Each crop's (tokens, dominant indices) from ``model``'s untouched twin (eager)."""
    hidden, attention, keys = tower_internals(model, pixel_values)
    heads = model.config.vision_config.num_attention_heads
    return [
        reference_crop(hidden[c], attention[c], keys[c], heads, DOMINANT, CONTEXTUAL)
        for c in range(len(hidden))
    ]


def projected(model, tokens):
    with torch.no_grad():
        return model.model.multi_modal_projector(tokens)


def test_llava_enters_the_dominant_and_contextual_tokens_of_its_rule():
    model, processor = zipped(attn="eager")
    twin, _ = tiny_model("llama", "llava", attn="eager")  # the same weights, no method
    inputs = encode(processor, PROMPTS, images(), model)
    expected = reference_crops(twin, inputs["pixel_values"])
    entering = entering_vision(model, inputs)
    for sample in range(2):
        tokens, kept = expected[sample]
        assert kept[0] == 0 and len(kept) == DOMINANT  # the CLS token leads the dominant ones
        assert entering[sample].shape[0] == DOMINANT + CONTEXTUAL
        assert torch.allclose(entering[sample], projected(twin, tokens), atol=1e-5)


def test_llava_next_zips_each_crop_and_lays_the_grid_out_in_reading_order():
    """The base crop's D + C tokens, the grid crops' kept patches in reading order of the whole
    grid, their CLS tokens, their contextual tokens; no newline tokens."""
    model, processor = zipped("next", attn="eager")
    twin, _ = tiny_model("llama", "next", attn="eager")
    inputs = encode(processor, PROMPTS, images(), model)
    config = model.config
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    entering = entering_vision(model, inputs)
    for sample, size in enumerate(inputs["image_sizes"].tolist()):
        crops = image_size_to_num_patches(size, config.image_grid_pinpoints, tile)
        rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)
        assert crops == 1 + rows * cols > 2
        zipped_crops = reference_crops(twin, inputs["pixel_values"][sample, :crops])
        placed = {}
        for crop, (tokens, kept) in enumerate(zipped_crops[1:]):
            for token, patch in zip(tokens[1:DOMINANT], [i - 1 for i in kept[1:]], strict=True):
                placed[
                    ((crop // cols) * side + patch // side, (crop % cols) * side + patch % side)
                ] = token
        grid = zipped_crops[1:]
        expected = torch.stack(
            [
                *zipped_crops[0][0],
                *(placed[key] for key in sorted(placed)),
                *(tokens[0] for tokens, _ in grid),
                *(token for tokens, _ in grid for token in tokens[DOMINANT:]),
            ]
        )
        assert len(entering[sample]) == crops * (DOMINANT + CONTEXTUAL)
        assert torch.allclose(entering[sample], projected(twin, expected), atol=1e-5)


def test_tokens_split_in_the_dominant_to_contextual_proportion():
    assert make_method("visionzip").counts == (191, 30)  # the official signature's defaults
    paper = make_method("visionzip", dominant=54, contextual=10)
    assert [paper.replace(tokens=n).counts for n in (64, 128, 192)] == [
        (54, 10),
        (108, 20),
        (162, 30),
    ]
    assert make_method("visionzip", tokens=1).counts == (1, 0)  # the CLS token alone


# ---- FLOPs ------------------------------------------------------------------------------------


def test_the_count_equals_the_flop_counter_on_a_real_prefill():
    model, processor = zipped(attn="eager")
    inputs = encode(processor, PROMPTS[:1], images()[:1], model)
    vision = int((inputs["input_ids"] == model.config.image_token_id).sum())
    # V: the image's tokens before VisionZip
    paper, full = counted_flops(model, 16, inputs["input_ids"].shape[1] - vision)
    measured = prefill_flops(model, inputs)
    linear, attention = measured.linear, measured.attention
    assert vision == DOMINANT + CONTEXTUAL
    assert linear == paper.flops
    assert attention == full.components["attention_products"]


def test_ranking_flops_equal_the_flop_counter_on_the_zip():
    model, _ = tiny_model("llama", "llava")
    shape = shape_from_hf_config(model.config)
    n, width = shape.vision.tokens_per_crop, shape.vision.hidden_size
    generator = torch.Generator().manual_seed(0)
    hidden, queries, keys = (torch.randn(1, n, width, generator=generator) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        zip_crops(hidden, queries, keys, shape.vision.num_heads, 0.25, DOMINANT, CONTEXTUAL)
    method = make_method("visionzip", dominant=DOMINANT, contextual=CONTEXTUAL)
    assert counter.get_total_flops() == method.ranking_flops(shape, DOMINANT + CONTEXTUAL, 20)
    assert (
        method.ranking_flops(shape, 3 * (DOMINANT + CONTEXTUAL), 20)
        == 3 * counter.get_total_flops()
    )


def test_a_crop_count_multiplies_what_enters():
    method = make_method("visionzip", dominant=54, contextual=10)
    assert method.entering_tokens(576) == method.entering_tokens(576, 1) == 64
    assert method.entering_tokens(2928, 5) == 320  # LLaVA-NeXT: base + 2 x 2 grid


def measured(crops: int) -> SampleMeasurement:
    vision = 0 if crops == 0 else 576 * crops
    return SampleMeasurement(
        task="grid", doc_id=0, request="generate_until", batch_size=1, vision_tokens=vision, text_tokens=9,
        prefix_text_tokens=1, prefill_s=0.1, end_to_end_s=0.1, kv_cache_bytes=1,
        dense_kv_cache_bytes=1, peak_memory_bytes=1, memory_kind="cpu", vision_crops=crops,
    )  # fmt: skip


def test_eval_counts_at_the_mean_crops_and_one_where_a_few_samples_hold_images():
    assert _mean_crops([measured(5), measured(1), measured(3)]) == 3
    # one image among nine text-only questions: its tokens still enter the model
    assert _mean_crops([measured(1)] + [measured(0)] * 9) == 1
    assert _mean_crops([measured(0)] * 3) == 0


# ---- backends, caching, batching ----------------------------------------------------------------

GENERATE = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)


def assert_same_generation(first, second, atol=1e-4):
    assert torch.equal(first.sequences, second.sequences)
    for a, b in zip(first.logits, second.logits, strict=True):
        assert torch.allclose(a, b, atol=atol)


@pytest.mark.parametrize("layout", ["llava", "next"])
def test_every_attention_backend_zips_alike(monkeypatch, layout):
    """eager, sdpa and the flash-attn 2 stand-in (tower and language model): the same tokens
    enter and the same answer comes out."""
    calls = install(monkeypatch)
    eager, processor = zipped(layout, attn="eager")
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    flash = copy.deepcopy(eager)
    flash.set_attn_implementation("flash_attention_2")
    inputs = encode(processor, PROMPTS, images(), eager)
    results = []
    for model in (eager, sdpa, flash):
        with torch.no_grad():
            results.append((entering_vision(model, inputs), model.generate(**inputs, **GENERATE)))
    for entering, generated in results[1:]:
        for a, b in zip(entering, results[0][0], strict=True):
            assert torch.allclose(a, b, atol=1e-5)
        assert_same_generation(generated, results[0][1])
    assert calls["flash_attn_varlen_func"] + calls["flash_attn_func"] > 0


@pytest.mark.parametrize("layout", ["llava", "next"])
def test_cached_equals_uncached_and_alone_equals_batched(layout):
    model, processor = zipped(layout)
    randomize_routers(model)  # apply_method gave it p-MoD's routers, which the method must not use
    batch = encode(processor, PROMPTS, images(), model)
    with torch.no_grad():
        cached = model.generate(**batch, **GENERATE)
        uncached = model.generate(**batch, **GENERATE, use_cache=False)
    assert_same_generation(cached, uncached)
    for sample in range(2):
        alone = encode(processor, [PROMPTS[sample]], [images()[sample]], model)
        with torch.no_grad():
            single = model.generate(**alone, **GENERATE)
        width = alone["input_ids"].shape[1]
        assert torch.equal(
            single.sequences[0, width:], cached.sequences[sample, -GENERATE["max_new_tokens"] :]
        )
        for a, b in zip(single.logits, cached.logits, strict=True):
            assert torch.allclose(a[0], b[sample], atol=1e-4)


def test_a_visionzip_model_refuses_unzipped_placeholders():
    model, processor = zipped()
    plain = processor(images=images()[:1], text=PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError, match="runs VisionZip 6\\+3 with 9 vision tokens per image"):
        model(**plain)


# ---- Qwen2.5-VL: after the merger --------------------------------------------------------------

QWEN_SPEC = "visionzip:dominant=200,contextual=100"  # of 576: 34 % + 17 % of each image


def qwen_batch(model, processor):
    processor.tokenizer.padding_side = "left"
    rows = [
        ("what colour?", random_image(60, 40, 0)),
        ("describe it please", random_image(120, 90, 1)),
    ]
    prompts = [build_prompt(processor, question, 1) for question, _ in rows]
    return encode(processor, prompts, [[image] for _, image in rows], model)


def official_qwen_rule(model, inputs, block_input, embeddings, dominant, contextual):
    """Per sample: (kept slots, {slot: state}), the official port's rule written out: the last
    block's attention per image (its own qkv weights, HF's vision RoPE, softmax over the image's
    patches), received = mean over heads of the column sums, averaged over each merge group and
    put back in raster order by HF's window index; D dominant by it, C targets by stride among
    the rest, each other token to the target of the most cosine-similar head-mean key."""
    visual = model.model.visual
    attention = visual.blocks[-1].attn
    states, cu_seqlens, (cos, sin) = block_input
    width, heads = states.shape[-1], attention.num_heads
    weight, bias = attention.qkv.weight, attention.qkv.bias
    q = (states @ weight[:width].T + bias[:width]).view(-1, heads, width // heads)
    k = (states @ weight[width : 2 * width].T + bias[width : 2 * width]).view(
        -1, heads, width // heads
    )
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    window, _ = get_vision_window_index(
        inputs["image_grid_thw"], visual.spatial_merge_size, visual.window_size, visual.patch_size
    )
    raster = torch.argsort(window)
    vision = inputs["input_ids"] == model.config.image_token_id
    bounds = cu_seqlens.tolist()
    expected = []
    for sample, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        probs = torch.stack(
            [
                (q[start:end, h].float() @ k[start:end, h].float().T * attention.scaling).softmax(
                    -1
                )
                for h in range(heads)
            ]
        )  # (heads, n, n)
        received = torch.zeros(q.shape[0])
        received[start:end] = probs.mean(0).sum(0)
        groups = received.view(-1, 4).mean(1)[raster]
        metric = k.float().view(-1, 4, heads, k.shape[-1]).mean(1)[raster].mean(1)
        first = start // 4
        n = (end - start) // 4
        scores, metric = groups[first : first + n], metric[first : first + n]
        slots = vision[sample].nonzero().view(-1)
        d = min(max(int(dominant * n / 576), 1), n)
        c = min(max(int(contextual * n / 576), 1), n - d)
        top = set(scores.topk(d).indices.tolist())
        rest = [i for i in range(n) if i not in top]
        targets = rest[:: max(1, len(rest) // c)][:c]
        unit = metric / metric.norm(dim=-1, keepdim=True)
        members = {t: [] for t in targets}
        for i in rest:
            if i not in members:
                members[max(targets, key=lambda t: float(unit[i] @ unit[t]))].append(i)
        states_of = {
            int(slots[t]): embeddings[sample, slots[t]]
            + (embeddings[sample, slots[members[t]]].mean(0) if members[t] else 0)
            for t in targets
        }
        kept = {int(slots[i]) for i in top} | set(states_of)
        expected.append((kept, states_of))
    return expected


def test_qwen2_5_vl_keeps_what_the_official_port_keeps_after_the_merger():
    model, processor = tiny_model(layout="qwen2_5_vl", attn="eager")
    apply_method(model, QWEN_SPEC)
    model.eval()
    inputs = qwen_batch(model, processor)
    captured = {}

    def keep_block_input(module, args, kwargs):
        captured["block"] = (args[0].detach(), kwargs["cu_seqlens"], kwargs["position_embeddings"])

    def keep_embeddings(module, args, kwargs):
        captured.setdefault(
            "embeddings", (args[0] if args else kwargs["hidden_states"]).detach().clone()
        )

    def keep_gathered(module, args, output):
        captured["gathered"] = args[0].detach().clone()

    layer0 = model.model.language_model.layers[0]
    hooks = [
        model.model.visual.blocks[-1].attn.register_forward_pre_hook(
            keep_block_input, with_kwargs=True
        ),
        layer0.register_forward_pre_hook(keep_embeddings, with_kwargs=True),
        layer0.input_layernorm.register_forward_hook(keep_gathered),
    ]
    with torch.no_grad(), record_routing(model) as routing:
        model(**inputs)
    for hook in hooks:
        hook.remove()
    expected = official_qwen_rule(
        model, inputs, captured["block"], captured["embeddings"], 200, 100
    )
    text = inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)
    for layer, decision in routing.layers.items():
        for sample, (kept, _) in enumerate(expected):
            slots = set(decision.keep_mask[sample].nonzero().view(-1).tolist())
            assert slots == kept | set(text[sample].nonzero().view(-1).tolist()), (layer, sample)
    assert sorted(routing.layers) == list(range(len(model.model.language_model.layers)))
    keep = routing.layers[0].keep_mask
    for sample, (_, states) in enumerate(expected):
        assert states
        for slot, state in states.items():
            row = int(keep[sample, :slot].sum())
            assert torch.allclose(captured["gathered"][sample, row], state, atol=1e-5)


def test_qwen2_5_vl_every_attention_backend_keeps_alike(monkeypatch):
    model, processor = tiny_model(layout="qwen2_5_vl", attn="eager")
    apply_method(model, QWEN_SPEC)
    assert_backends_keep_alike(model.eval(), qwen_batch(model, processor), monkeypatch)


def test_qwen2_5_vl_counts_and_refusals():
    """One image's D + C in every layer and its KV cache; video and two images refused."""
    method = make_method("visionzip").for_family("qwen2_5_vl")
    assert method.image_counts(576) == (191, 30) and method.image_counts(100) == (33, 5)
    assert method.kept_vision_tokens([1.0] * 4, 100) == [38] * 4
    assert make_method("visionzip", dominant=374, contextual=29).for_family(
        "qwen2_5_vl"
    ).image_counts(1000) == (649, 50)
    result = CliRunner().invoke(
        app,
        [
            "flops",
            "--model",
            "qwen2.5-vl-7b",
            "--method",
            "pmod,visionzip",
            "--match-tflops",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    pmod, zip_plan = json.loads(result.output)["plans"][:2]
    assert abs(zip_plan["tflops"] / pmod["tflops"] - 1) <= 0.02
    model, processor = tiny_model(layout="qwen2_5_vl")
    apply_method(model, QWEN_SPEC)
    prompt = build_prompt(processor, "compare", 2)
    two = encode(processor, [prompt], [[random_image(60, 40, 0), random_image(40, 60, 1)]], model)
    with pytest.raises(MethodError, match="visionzip chooses within one image per sample"):
        model(**two)


# ---- families and flags ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["onevision", "qwen3_vl"])
def test_other_families_are_refused_in_one_line(layout):
    model, _ = tiny_model("qwen2", layout) if layout == "onevision" else tiny_model(layout=layout)
    with pytest.raises(
        MethodError, match="visionzip compresses a CLIP tower's crops .* does not run on"
    ):
        apply_method(model, SPEC)


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--model", "qwen3-vl-8b", "--method", "visionzip"], "does not run on Qwen3-VL"),
        (
            ["--model", "llava-onevision-qwen2-7b", "--method", "visionzip"],
            "does not run on LLaVA-OneVision",
        ),
        (
            ["--model", "llava-1.5-7b", "--method", "visionzip:dominant=0"],
            "include the CLS token: at least 1",
        ),
        (
            ["--model", "llava-1.5-7b", "--method", "visionzip:dominant=500,contextual=100"],
            "more than the 576",
        ),
        (
            ["--model", "llava-1.5-7b", "--method", "visionzip:tokens=64", "--match-tflops"],
            "drop tokens=",
        ),
    ],
)
def test_bad_settings_end_in_one_error_line(monkeypatch, capsys, arguments, message):
    monkeypatch.setattr("sys.argv", ["pmod", "flops", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err, err


def test_pmod_eval_refuses_another_family_in_one_line(tmp_path, monkeypatch, capsys):
    model, processor = tiny_model(layout="qwen3_vl")
    save_checkpoint(model, processor, tmp_path / "qwen")
    capsys.readouterr()  # the save's progress bar
    command = ["pmod", "eval", str(tmp_path / "qwen"), "--tasks", "pmod_tiny_vqa", "--method", SPEC]
    monkeypatch.setattr("sys.argv", command)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "does not run on Qwen3-VL" in err, err


def test_pmod_eval_refuses_a_tower_read_at_its_embeddings_before_evaluating(
    tmp_path, monkeypatch, capsys
):
    """A LLaVA whose feature layer is the tower's embeddings (the grid study's one-layer tower)
    has no attention there to rank by: refused from its config, before any method runs."""
    model, processor = tiny_model("llama", "llava")
    model.config.vision_feature_layer = -(model.config.vision_config.num_hidden_layers + 1)
    save_checkpoint(model, processor, tmp_path / "llava")
    capsys.readouterr()  # the save's progress bar
    with pytest.raises(MethodError, match="needs a feature layer after the tower's embeddings"):
        check_method_fits(tmp_path / "llava", make_method("visionzip"))  # the up-front check
    output = tmp_path / "eval.json"
    err = cli_refusal(
        monkeypatch, capsys, "eval", str(tmp_path / "llava"), "--tasks", "pmod_tiny_vqa", "--limit", "2",
        "--method", "dense," + SPEC, "--output", str(output),
    )  # fmt: skip
    assert err == "error: visionzip needs a feature layer after the tower's embeddings"
    assert not output.exists()


@pytest.mark.parametrize("preset", ["llava-1.5-7b", "llava-1.5-13b"])
def test_match_tflops_lands_within_two_percent(preset):
    result = CliRunner().invoke(
        app,
        ["flops", "--model", preset, "--method", "visionzip", "--match-tflops", "--json"],
    )
    assert result.exit_code == 0, result.output
    pmod, zip_plan = json.loads(result.output)["plans"][:2]
    assert zip_plan["method"] == "visionzip" and zip_plan["matched"]
    assert abs(zip_plan["tflops"] / pmod["tflops"] - 1) <= 0.02


@pytest.mark.slow
def test_pmod_eval_runs_visionzip_side_by_side(tmp_path):
    model, processor = tiny_model("llama", "llava", layers=4)
    apply_pmod(model, beta=0.5)
    randomize_routers(model)
    checkpoint = save_checkpoint(model, processor, tmp_path / "pmod")
    runs, _ = eval_side_by_side(
        checkpoint, tmp_path / "eval.json", f"dense,{SPEC}", "--match-tflops"
    )
    assert list(runs) == ["dense", "visionzip"]
    zip_run = runs["visionzip"]
    matched = make_method(
        "visionzip", **{k: v for k, v in zip_run["method"].items() if k != "name"}
    )
    assert matched.tokens is not None and zip_run["label"] == f"pmod: {matched.label}"
    assert zip_run["matched_at"]["vision_tokens"] == 16
    efficiency = zip_run["efficiency"]
    assert efficiency["mean_vision_tokens"] == 16  # the image's V, before VisionZip
    assert efficiency["tflops"] < runs["dense"]["efficiency"]["tflops"]
    for measurement in zip_run["measurements"]:
        entry = measurement["dense_kv_cache_bytes"] // (4 * (measurement["text_tokens"] + 16))
        kept = measurement["text_tokens"] + matched.tokens
        assert measurement["kv_cache_bytes"] == 4 * kept * entry


@pytest.mark.slow
def test_pmod_eval_counts_llava_next_images_at_their_own_crops(tmp_path):
    """On LLaVA-NeXT VisionZip keeps D + C tokens of each crop an image has (not of the largest
    layout's): eval's V is the images' own (the dense column's), each sample's crops are what its
    cache holds, and the TFLOPs, matched and reported, are counted at those crops."""
    model, processor = tiny_model("llama", "next")
    checkpoint = save_checkpoint(model, processor, tmp_path / "next")
    runs, _ = eval_side_by_side(
        checkpoint, tmp_path / "eval.json", "dense,visionzip", "--match-tflops"
    )
    dense, zipped = runs["dense"], runs["visionzip"]
    method = method_from_dict(zipped["method"])
    assert zipped["efficiency"]["mean_vision_tokens"] == dense["efficiency"]["mean_vision_tokens"]
    crops = []
    for plain, zip_row in zip(dense["measurements"], zipped["measurements"], strict=True):
        assert zip_row["vision_tokens"] == plain["vision_tokens"]
        assert zip_row["dense_kv_cache_bytes"] == plain["kv_cache_bytes"]
        tokens = plain["text_tokens"] + plain["vision_tokens"]
        held = zip_row["kv_cache_bytes"] * tokens / plain["kv_cache_bytes"]  # T + the kept
        crops.append((held - plain["text_tokens"]) / method.per_crop)
        assert zip_row["vision_crops"] == crops[-1]
    shape = shape_from_hf_config(model.config)
    assert min(crops) < shape.vision_crops  # an image smaller than the largest layout
    assert zipped["matched_at"]["vision_crops"] in crops
    count = count_flops(
        shape,
        vision_tokens=round(dense["efficiency"]["mean_vision_tokens"]),
        text_tokens=round(dense["efficiency"]["mean_text_tokens"]),
        vision_crops=round(sum(crops) / len(crops)),
        method=method,
        dtype="fp32",
    )
    assert zipped["efficiency"]["tflops"] == count.tflops
