"""``pmod visualize`` end to end: a router forced to keep known patches, and the user errors.

The tiny models are rewired into brightness detectors: each patch feature's channel 0 is
gelu(+-5.6) for a bright or dark patch (CLIP's encoder layer is made an identity, the patch
embedding averages the red channel, the projector copies channel 0), and layer 0's router
scores channel 0. With layer 0 keeping exactly as many tokens as there are bright patches, the
figure must outline exactly the bright regions of the image.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_checkpoint, tiny_model

from pmod_cli import PMoDConfig, apply_method, apply_pmod
from pmod_cli.cli import main
from pmod_cli.model.loading import load_checkpoint
from pmod_cli.visualization.selection import select_tokens
from pmod_cli.visualization.visualize import visualize_routing


def brightness_router_model(layout: str, first_layer_ratio: float):
    model, processor = tiny_model(layout=layout, layers=2)
    vision = model.model.vision_tower  # CLIPVisionModel: embeddings, pre_layrnorm, encoder
    with torch.no_grad():
        patch_embedding = vision.embeddings.patch_embedding.weight  # (hidden, 3, 14, 14)
        patch_embedding.zero_()
        patch_embedding[0, 0] = 1.0 / (patch_embedding.shape[-1] * patch_embedding.shape[-2])
        vision.embeddings.position_embedding.weight.zero_()
        vision.pre_layrnorm.weight.fill_(1.0)
        vision.pre_layrnorm.bias.zero_()
        for layer in vision.encoder.layers:  # residual branches off: each layer passes its input on
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        for linear in (
            model.model.multi_modal_projector.linear_1,
            model.model.multi_modal_projector.linear_2,
        ):
            linear.weight.zero_()
            linear.weight[0, 0] = 1.0
            linear.bias.zero_()
        if layout == "next":  # newline tokens must lose against every patch
            model.model.image_newline.zero_()
            model.model.image_newline[0] = -1.0
    apply_pmod(model, PMoDConfig(ratios=[first_layer_ratio, 1.0]))
    with torch.no_grad():
        router = model.model.language_model.layers[0].router
        router.weight.zero_()
        router.weight[0, 0] = 10.0
        router.bias.zero_()
    return model, processor


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize")
    # LLaVA: 16 tokens, 2 bright patches; NeXT (168x56): 34 tokens, 3 bright (1 base + 2 high-res)
    llava = save_checkpoint(*brightness_router_model("llava", 2 / 16), root / "llava")
    llava_next = save_checkpoint(*brightness_router_model("next", 0.09), root / "next")
    dense_model, dense_processor = tiny_model(layout="llava", layers=2)
    dense = save_checkpoint(dense_model, dense_processor, root / "dense")
    return {"llava": llava, "next": llava_next, "dense": dense, "root": root}


def image_file(path, width, height, bright_regions):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for x0, y0, x1, y1 in bright_regions:
        pixels[y0:y1, x0:x1] = 255
    Image.fromarray(pixels).save(path)
    return path


def kept_rectangles(figure, label):
    axes = next(axes for axes in figure.axes if axes.get_label() == label)
    kept = next(c for c in axes.collections if c.get_gid() == "kept")
    return {
        tuple(
            round(float(v), 2)
            for v in (
                p.vertices[:, 0].min(),
                p.vertices[:, 1].min(),
                p.vertices[:, 0].max(),
                p.vertices[:, 1].max(),
            )
        )
        for p in kept.get_paths()
    }


def test_llava_figure_outlines_exactly_the_bright_patches(checkpoints, tmp_path):
    # 168x112 -> resized 84x56 -> centre crop 56: the crop covers original x 28..140 in 28-px patches.
    # bright: patch (row 1, col 2) and (row 3, col 0), plus a strip the crop cuts away
    image = image_file(
        tmp_path / "two.png", 168, 112, [(84, 28, 112, 56), (28, 84, 56, 112), (0, 0, 20, 112)]
    )
    result = visualize_routing(
        image, checkpoint=checkpoints["llava"], layers="0,1", output=tmp_path / "out.png"
    )
    assert result.output.exists()
    assert kept_rectangles(result.figure, "layer 0 image") == {(84, 28, 112, 56), (28, 84, 56, 112)}
    assert result.selection.layers[0].kept_count == 2 and result.selection.layers[1].is_dense
    assert len(kept_rectangles(result.figure, "layer 1 image")) == 16


def test_llava_next_figure_outlines_the_bright_region_in_both_views(checkpoints, tmp_path):
    # 168x56: base view = whole image squashed to 56x56 (patches of 42x14 original px);
    # high-res = 112x38 padded by 9 px into 56x112, rows 1-2 kept, columns of 21 px,
    # row 2 spans original y (28-9)*56/38 .. (42-9)*56/38
    image = image_file(tmp_path / "wide.png", 168, 56, [(84, 28, 126, 42)])
    result = visualize_routing(
        image,
        checkpoint=checkpoints["next"],
        layers=[0, 1],
        output=tmp_path / "out.png",
        matrix=True,
    )
    assert kept_rectangles(result.figure, "layer 0 base") == {(84, 28, 126, 42)}
    row2 = (round(19 * 56 / 38, 2), round(33 * 56 / 38, 2))
    assert kept_rectangles(result.figure, "layer 0 high-res") == {
        (84, row2[0], 105, row2[1]),
        (105, row2[0], 126, row2[1]),
    }
    labels = {axes.get_label() for axes in result.figure.axes}
    assert labels == {
        "layer 0 base",
        "layer 0 high-res",
        "layer 1 base",
        "layer 1 high-res",
        "matrix",
    }
    with Image.open(result.output) as written:
        assert written.format == "PNG"


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["pmod", "visualize", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_prints_the_kept_table_and_writes_the_figure(
    checkpoints, tmp_path, monkeypatch, capsys
):
    image = image_file(tmp_path / "two.png", 168, 112, [(84, 28, 112, 56), (28, 84, 56, 112)])
    output = tmp_path / "figs" / "routing.png"
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        image,
        "--checkpoint",
        checkpoints["llava"],
        "--heatmap",
        "--matrix",
        "--output",
        output,
    )
    assert code == 0
    assert output.exists()
    rows = [line for line in out.splitlines() if "MoD" in line or "dense" in line]
    assert len(rows) == 2 and "2/16" in rows[0] and "16/16" in rows[1]
    assert f"figure written to {output}" in out

    # --json: the same numbers as one object on stdout; -o is --output
    code, out, err = run_cli(
        monkeypatch, capsys, image, "--checkpoint", checkpoints["llava"], "-o", output,
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["figure"] == str(output) and report["vision_tokens"] == 16
    assert [(row["type"], row["kept"]) for row in report["layers"]] == [("MoD", 2), ("dense", 16)]


def test_method_draws_what_that_method_keeps(checkpoints, tmp_path, monkeypatch, capsys):
    """--method: the checkpoint runs another method, and the table and JSON show its kept tokens,
    the same as that method's own routing record; a method whose tokens are no patches is refused."""
    image = image_file(tmp_path / "two.png", 168, 112, [(84, 28, 112, 56)])
    args = [image, "--checkpoint", checkpoints["llava"], "-o", tmp_path / "f.png", "--json"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--method", "fastv:layer=1,ratio=0.25")
    assert code == 0, err
    report = json.loads(out)
    # FastV at K=1 keeps round(16 * 0.75) = 12 from layer 1 on; layer 0 sees every token
    assert [row["kept"] for row in report["layers"]] == [16, 12]
    model, processor = load_checkpoint(checkpoints["llava"])
    apply_method(model, "fastv:layer=1,ratio=0.25")
    reference = select_tokens(model, processor, [Image.open(image)], "Describe the image.", 0)
    assert [layer.kept_count for layer in reference.layers] == [16, 12]
    # SparseVLM after layer 0: 8 of 16 by the raters, plus 1 recycled in a pruned token's place
    code, out, err = run_cli(monkeypatch, capsys, *args, "--method", "sparsevlm:layers=0")
    assert code == 0, err
    assert [row["kept"] for row in json.loads(out)["layers"]] == [16, 9]
    for spec in ("pool:tokens=4", "visionzip:dominant=6,contextual=2"):
        code, _, err = run_cli(monkeypatch, capsys, *args, "--method", spec)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "changes the vision tokens before the language model" in err
    code, _, err = run_cli(monkeypatch, capsys, *args, "--method", "fastv:K=1")
    assert code == 2 and "unknown option(s) K for method fastv" in err, err


@pytest.mark.parametrize(
    "case,message",
    [
        ("layer out of range", "layer 2 is out of range; the model has 2 decoder layers (0-1)"),
        ("missing image", "image not found"),
        ("unreadable image", "cannot read"),
        (
            "no default checkpoint",
            "pmod pretrain recipes/tiny_pretrain.toml && pmod sft recipes/tiny.toml",
        ),
        ("dense checkpoint", "not a p-MoD one"),
        ("bad output suffix", "use a .png"),
    ],
)
def test_user_errors_end_in_one_line_and_exit_code_2(
    case, message, checkpoints, tmp_path, monkeypatch, capsys
):
    image = image_file(tmp_path / "ok.png", 56, 56, [])
    args = [image, "--checkpoint", checkpoints["llava"], "--output", tmp_path / "out.png"]
    if case == "layer out of range":
        args += ["--layers", "0,2"]
    elif case == "missing image":
        args[0] = tmp_path / "nope.png"
    elif case == "unreadable image":
        args[0] = tmp_path / "text.png"
        args[0].write_text("not an image\n")
    elif case == "no default checkpoint":
        monkeypatch.chdir(tmp_path)  # no runs/tiny/sft here
        args = [image]
    elif case == "dense checkpoint":
        args[2] = checkpoints["dense"]
    elif case == "bad output suffix":
        args[-1] = tmp_path / "out.txt"
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out.png").exists()


# ---- LLaVA-OneVision: several images side by side, a video as frames x layers ----------------


def brightness_router_onevision(first_layer_ratio: float):
    """The brightness detector on a tiny OneVision (SigLIP-style tower: no pre-norm, no CLS)."""
    model, processor = tiny_model(layout="onevision", layers=2)
    vision = model.model.vision_tower
    with torch.no_grad():
        patch_embedding = vision.embeddings.patch_embedding.weight  # (hidden, 3, 14, 14)
        patch_embedding.zero_()
        patch_embedding[0, 0] = 1.0 / (patch_embedding.shape[-1] * patch_embedding.shape[-2])
        vision.embeddings.patch_embedding.bias.zero_()
        vision.embeddings.position_embedding.weight.zero_()
        for layer in vision.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        for linear in (
            model.model.multi_modal_projector.linear_1,
            model.model.multi_modal_projector.linear_2,
        ):
            linear.weight.zero_()
            linear.weight[0, 0] = 1.0
            linear.bias.zero_()
        model.model.image_newline.zero_()
        model.model.image_newline[0] = -1.0  # newline tokens lose against every patch
    apply_pmod(model, PMoDConfig(ratios=[first_layer_ratio, 1.0]))
    with torch.no_grad():
        router = model.model.language_model.layers[0].router
        router.weight.zero_()
        router.weight[0, 0] = 10.0
        router.bias.zero_()
    return model, processor


def test_onevision_video_is_a_frames_by_layers_grid_of_the_bright_patches(tmp_path):
    from pmod_cli.data.video import write_video

    # 3 frames of 56x56; in frame f the bright 28x28 quadrant moves: pooled 2x2, one token each
    quadrants = [(0, 0, 28, 28), (28, 0, 56, 28), (28, 28, 56, 56)]
    frames = np.zeros((3, 56, 56, 3), dtype=np.uint8)
    for frame, (x0, y0, x1, y1) in enumerate(quadrants):
        frames[frame, y0:y1, x0:x1] = 255
    video = write_video(tmp_path / "moving.mp4", frames)
    # 3 frames x 4 pooled tokens + the closing newline = 13 vision tokens; keep the 3 bright ones
    checkpoint = save_checkpoint(*brightness_router_onevision(3.2 / 13), tmp_path / "ov")
    result = visualize_routing(
        video=video,
        frames=3,
        checkpoint=checkpoint,
        layers="0,1",
        output=tmp_path / "video.png",
        matrix=True,
    )
    assert result.selection.num_vision == 13 and result.selection.layers[0].kept_count == 3
    for frame, quadrant in enumerate(quadrants):
        assert kept_rectangles(result.figure, f"layer 0 frame {frame + 1}") == {quadrant}
        assert (
            len(kept_rectangles(result.figure, f"layer 1 frame {frame + 1}")) == 4
        )  # a dense layer
    labels = {axes.get_label() for axes in result.figure.axes}
    assert labels == {f"layer {layer} frame {frame}" for layer in (0, 1) for frame in (1, 2, 3)} | {
        "matrix"
    }


def test_onevision_several_images_side_by_side(tmp_path, monkeypatch, capsys):
    # two images in one prompt: each padded to a square, one 56 px crop of 4x4 patches + a newline
    first = image_file(tmp_path / "first.png", 56, 56, [(14, 14, 28, 28)])
    second = image_file(
        tmp_path / "second.png", 112, 56, [(0, 0, 28, 28)]
    )  # padded by 28 px above and below
    checkpoint = save_checkpoint(*brightness_router_onevision(2.5 / 34), tmp_path / "ov")
    result = visualize_routing(
        [first, second], checkpoint=checkpoint, layers=[0], output=tmp_path / "pair.png"
    )
    assert kept_rectangles(result.figure, "layer 0 image 1") == {(14, 14, 28, 28)}
    assert kept_rectangles(result.figure, "layer 0 image 2") == {(0, 0, 28, 28)}
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        first,
        second,
        "--checkpoint",
        checkpoint,
        "--output",
        tmp_path / "cli.png",
    )
    assert code == 0 and "2/34" in out and (tmp_path / "cli.png").exists()


@pytest.mark.parametrize(
    "case,message",
    [
        ("no input", "missing argument 'IMAGE'"),
        ("unreadable video", "cannot read"),
        ("video for LLaVA", "takes no video"),
    ],
)
def test_video_user_errors_end_in_one_line(
    case, message, checkpoints, tmp_path, monkeypatch, capsys
):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not a video")
    if case == "no input":
        args = ["--checkpoint", checkpoints["llava"]]
    elif case == "unreadable video":
        checkpoint = save_checkpoint(*brightness_router_onevision(0.5), tmp_path / "ov")
        args = ["--video", clip, "--checkpoint", checkpoint]
    else:
        from pmod_cli.data.video import write_video

        args = [
            "--video",
            write_video(tmp_path / "ok.mp4", np.zeros((2, 56, 56, 3), np.uint8)),
            "--checkpoint",
            checkpoints["llava"],
        ]
    capsys.readouterr()  # what saving the checkpoint printed
    code, _, err = run_cli(monkeypatch, capsys, *args, "--output", tmp_path / "out.png")
    lines = err.strip().splitlines()
    assert (
        code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    ), err
    assert not (tmp_path / "out.png").exists()
