"""``pmod arank`` end to end on tiny checkpoints saved to disk: plain HF LLaVA and p-MoD LLaVA-NeXT.

A random tiny model attends almost uniformly, which has full ARank (n - 1) in every layer. To give
the command something to find, two layers are made self-attending (each query head reads the
same hidden dimensions as its key head, scaled up, so q_i . k_j peaks at j = i): with the
diagonal zeroed such layers have a low ARank, the stronger the scale the lower.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image
from tiny_models import random_image, randomize_routers, save_checkpoint, tiny_model

from pmod_cli import PMoDConfig, apply_pmod
from pmod_cli.analysis.arank import attention_rank, load_arank_layers
from pmod_cli.cli import main
from pmod_cli.data.prompts import build_prompt
from pmod_cli.data.tiny import resolve_tiny_path
from pmod_cli.model import mod_layer_indices, record_routing

SELF_ATTENDING = {0: 8.0, 2: 4.0}  # layer -> scale; the stronger scale gives the lower ARank
NUM_IMAGE_SAMPLES = 5


def make_self_attending(attention, scale: float) -> None:
    config = attention.config
    head_dim = attention.head_dim
    group = config.num_attention_heads // config.num_key_value_heads
    query = torch.zeros_like(attention.q_proj.weight)  # (heads * head_dim, hidden)
    key = torch.zeros_like(attention.k_proj.weight)  # (kv_heads * head_dim, hidden)
    for head in range(config.num_attention_heads):
        kv_head = head // group
        for dim in range(head_dim):
            query[head * head_dim + dim, kv_head * head_dim + dim] = scale
    for kv_head in range(config.num_key_value_heads):
        for dim in range(head_dim):
            key[kv_head * head_dim + dim, kv_head * head_dim + dim] = scale
    attention.q_proj.weight.copy_(query)
    attention.k_proj.weight.copy_(key)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("arank")
    llava, llava_processor = tiny_model("llama", "llava", layers=4)
    with torch.no_grad():
        for layer, scale in SELF_ATTENDING.items():
            make_self_attending(llava.model.language_model.layers[layer].self_attn, scale)
    next_model, next_processor = tiny_model("llama", "llava_next", layers=4, seed=1)
    with torch.no_grad():  # one dense and one MoD layer with a rank worth comparing
        for layer in (0, 1):
            make_self_attending(next_model.model.language_model.layers[layer].self_attn, 4.0)
    apply_pmod(next_model, PMoDConfig(schedule="constant", beta=0.5, mod_layers=[1, 3]))
    randomize_routers(next_model)
    images = root / "images"
    images.mkdir()
    samples = [
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
        }
    ]
    for index in range(NUM_IMAGE_SAMPLES):
        # different sizes (NeXT: different anyres grids) and question lengths: batches need padding
        random_image(56 + 28 * (index % 3), 56, index).save(images / f"{index}.png")
        question = "<image>\nwhat colour is the square?" + " please" * index
        samples.append(
            {
                "id": f"s{index}",
                "image": f"{index}.png",
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    data = root / "data.json"
    data.write_text(json.dumps(samples))
    return {
        "llava": save_checkpoint(llava, llava_processor, root / "llava"),
        "pmod_next": save_checkpoint(next_model, next_processor, root / "pmod_next"),
        "data": data,
        "images": images,
    }


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["pmod", "arank", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def reference_arank(checkpoint, data, images):
    """ARank computed independently: one sample at a time (no padding), from output_attentions."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, attn_implementation="eager"
    ).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    samples = [s for s in json.loads(data.read_text()) if "image" in s]
    ranks = torch.zeros(len(model.model.language_model.layers), dtype=torch.float64)
    tokens = torch.zeros_like(ranks)
    for sample in samples:
        question = sample["conversations"][0]["value"].replace("<image>", "").strip()
        image = Image.open(images / sample["image"]).convert("RGB")
        inputs = processor(
            text=[build_prompt(processor, question)], images=[image], return_tensors="pt"
        )
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        for layer, attention in enumerate(attentions):  # (1, heads, n, n)
            ranks[layer] += attention_rank(attention[0]).float().mean()
            tokens[layer] += attention.shape[-1]
    return (ranks / len(samples)).tolist(), (tokens / len(samples)).tolist(), model, processor


@pytest.mark.slow
def test_plain_llava_table_plot_and_result_file(workspace, tmp_path, monkeypatch, capsys):
    plot, saved = tmp_path / "plots" / "arank.png", tmp_path / "arank.json"
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        workspace["llava"],
        "--data",
        workspace["data"],
        "--image-folder",
        workspace["images"],
        "--samples",
        8,
        "--batch-size",
        2,
        "--dense-layers",
        2,
        "--output",
        plot,
        "--save",
        saved,
    )
    assert code == 0
    with Image.open(plot) as written:
        assert written.format == "PNG"
    result = json.loads(saved.read_text())
    assert set(result) >= {"arank", "dense_layers", "mod_layers", "model", "samples"}
    assert (
        result["samples"] == NUM_IMAGE_SAMPLES and result["skipped"] == 1
    )  # only 5 of the 6 have an image
    arank, tokens = result["arank"], result["tokens"]
    # the untouched layers attend everywhere: full rank; the self-attending ones lose rank with scale
    assert arank[1] == arank[3] == tokens[1] - 1
    assert arank[0] < arank[2] < arank[1]
    assert result["dense_layers"] == [1, 3] and result["mod_layers"] == [0, 2]
    assert load_arank_layers(saved, num_layers=4) == [0, 2]
    rows = [line for line in out.splitlines() if line.strip().startswith("│")]
    assert len(rows) == 4 and "dense" in rows[1] and "MoD" in rows[0]
    assert "recipe: mod_layers = [0, 2]" in out and f"plot written to {plot}" in out


def test_batched_measure_matches_single_sample_reference(workspace, tmp_path, monkeypatch, capsys):
    # the p-MoD NeXT model: MoD layers 1 and 3 attend over their kept tokens only
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        workspace["pmod_next"],
        "--data",
        workspace["data"],
        "--image-folder",
        workspace["images"],
        "--samples",
        NUM_IMAGE_SAMPLES,
        "--batch-size",
        3,
        "--dense-layers",
        1,
        "--output",
        tmp_path / "a.svg",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    ranks, tokens, model, processor = reference_arank(
        workspace["pmod_next"], workspace["data"], workspace["images"]
    )
    assert result["arank"] == pytest.approx(ranks, abs=1e-6)
    assert result["tokens"] == pytest.approx(tokens, abs=1e-6)
    assert result["checkpoint_mod_layers"] == [1, 3] and result["plot"] == str(tmp_path / "a.svg")
    # a MoD layer's maps are over its kept tokens: text plus floor(vision * 0.5) per sample
    assert tokens[1] == tokens[3] < tokens[0] == tokens[2]
    assert ranks[0] < tokens[0] - 10 and ranks[1] < tokens[1] - 10  # the self-attending layers
    sample = json.loads(workspace["data"].read_text())[1]
    image = Image.open(workspace["images"] / sample["image"]).convert("RGB")
    question = sample["conversations"][0]["value"].replace("<image>", "").strip()
    inputs = processor(
        text=[build_prompt(processor, question)], images=[image], return_tensors="pt"
    )
    with torch.no_grad(), record_routing(model) as routing:
        attentions = model(**inputs, output_attentions=True).attentions
    vision = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert (
        attentions[1].shape[-1]
        == routing.layers[1].keep_mask.sum()
        == inputs["input_ids"].shape[1] - vision + vision // 2
    )


def test_result_file_drives_the_conversion(workspace, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "arank.json"
    code, _, _ = run_cli(
        monkeypatch,
        capsys,
        workspace["llava"],
        "--data",
        workspace["data"],
        "--image-folder",
        workspace["images"],
        "--samples",
        2,
        "--dense-layers",
        3,
        "--output",
        tmp_path / "a.png",
        "--save",
        saved,
        "--json",
    )
    assert code == 0
    model, _ = tiny_model("llama", "llava", layers=4)
    apply_pmod(
        model,
        PMoDConfig(
            schedule="constant", beta=0.5, mod_layers=load_arank_layers(saved, num_layers=4)
        ),
    )
    assert mod_layer_indices(model) == [
        0
    ]  # the lowest-ARank layer, the most strongly self-attending
    assert model.retention_ratios == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing checkpoint", "checkpoint directory not found"),
        ("missing data", "data file"),
        ("unreadable data", "cannot parse"),
        ("wrong image folder", "not found; pass --image-folder"),
        ("too many dense layers", "--dense-layers 4 must be between 0 and 3"),
        ("no samples", "--samples must be at least 1"),
        ("bad output suffix", "use a .png"),
        ("bad dtype", "--dtype must be one of"),
    ],
)
def test_user_errors_end_in_one_line_and_exit_code_2(
    case, message, workspace, tmp_path, monkeypatch, capsys
):
    options = {
        "--data": workspace["data"],
        "--image-folder": workspace["images"],
        "--output": tmp_path / "out.png",
        "--dense-layers": 2,  # the default 4 would leave these 4-layer models no MoD layer
    }
    checkpoint = workspace["llava"]
    if case == "missing checkpoint":
        checkpoint = tmp_path / "nowhere"
    elif case == "missing data":
        options["--data"] = tmp_path / "nope.json"
    elif case == "unreadable data":
        options["--data"] = tmp_path / "broken.json"
        options["--data"].write_text("[{not json")
    elif case == "wrong image folder":
        options["--image-folder"] = tmp_path
    elif case == "too many dense layers":
        options["--dense-layers"] = 4
    elif case == "no samples":
        options["--samples"] = 0
    elif case == "bad output suffix":
        options["--output"] = tmp_path / "out.txt"
    elif case == "bad dtype":
        options["--dtype"] = "int8"
    args = [checkpoint] + [str(v) for pair in options.items() for v in pair]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out.png").exists()


def test_tiny_names_for_checkpoint_and_data(tmp_path, monkeypatch, capsys):
    """The names the docs give (``tiny:base``, ``tiny:shapes/heldout.json``) reach the resolver."""
    code, out, err = run_cli(
        monkeypatch, capsys, "tiny:base", "--data", "tiny:shapes/heldout.json", "--samples", 2,
        "--batch-size", 2, "--dense-layers", 1, "--output", tmp_path / "arank.png", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == str(resolve_tiny_path("tiny:base")) and result["samples"] == 2
    assert len(result["arank"]) == len(result["dense_layers"]) + len(result["mod_layers"])
