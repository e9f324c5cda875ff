"""``pmod chat`` and the answer ``pmod visualize`` prints: what a user reads equals what the model
generates for the prompt every other command builds, and the efficiency line is the measured one."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch
from tiny_models import random_image, randomize_routers, save_checkpoint, tiny_model

from pmod_cli import PMoDConfig, apply_method, apply_pmod
from pmod_cli.cli import main
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.model.loading import load_checkpoint
from pmod_cli.visualization.visualize import visualize_routing


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    dense_model, dense_processor = tiny_model(layout="llava", layers=3)
    dense = save_checkpoint(dense_model, dense_processor, root / "dense")
    model, processor = tiny_model(layout="llava", layers=3)
    apply_pmod(model, PMoDConfig(ratios=[1.0, 0.5, 0.25]))
    randomize_routers(model)
    pmod = save_checkpoint(model, processor, root / "pmod")
    image = root / "image.png"
    random_image(70, 56, seed=5).save(image)
    return {"dense": dense, "pmod": pmod, "image": image}


def run_cli(monkeypatch, capsys, *args, stdin: str | None = None):
    monkeypatch.setattr(sys, "argv", ["pmod", *map(str, args)])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def greedy_answer(checkpoint, image_path, question, history=(), max_new_tokens=8):
    model, processor = load_checkpoint(checkpoint)
    from PIL import Image

    with Image.open(image_path) as image:
        images = [image.convert("RGB")]
    prompt = build_prompt(processor, question, 1, "vicuna_v1", history)
    inputs = encode(processor, [prompt], images, model)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    return processor.tokenizer.decode(
        output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()


def test_one_question_prints_the_greedy_answer_and_the_measured_costs(
    checkpoints, monkeypatch, capsys
):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "chat",
        checkpoints["pmod"],
        "--image",
        checkpoints["image"],
        "what colour is the square?",
        "--max-new-tokens",
        "8",
    )
    assert code in (0, None)
    # as streamed: no leading space from a word-initial first token, one newline at the end
    assert (
        out
        == greedy_answer(checkpoints["pmod"], checkpoints["image"], "what colour is the square?")
        + "\n"
    )
    (line,) = err.strip().splitlines()
    # 16 vision tokens; layers keep 16, 8, 4 of them next to every text token
    match = re.search(r"prompt (\d+) vision \+ (\d+) text tokens", line)
    vision, text = int(match[1]), int(match[2])
    assert vision == 16
    kv_share = (3 * text + 16 + 8 + 4) / (3 * (text + vision))
    assert line.startswith("p-MoD: ") and f"({100 * kv_share:.1f}% of dense)" in line


def test_a_conversation_from_stdin_keeps_its_history(checkpoints, monkeypatch, capsys):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "chat",
        checkpoints["dense"],
        "--image",
        checkpoints["image"],
        "--max-new-tokens",
        "6",
        stdin="describe the image\n\nhow many circles\n",
    )
    assert code in (0, None)
    first, second = out.strip("\n").split("\n")
    assert first.strip() == greedy_answer(
        checkpoints["dense"], checkpoints["image"], "describe the image", max_new_tokens=6
    )
    history = [("describe the image", first.strip())]
    assert second.strip() == greedy_answer(
        checkpoints["dense"], checkpoints["image"], "how many circles", history, 6
    )
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(
        line.startswith("dense: ") and "(100.0% of dense)" in line for line in lines
    )


def test_a_bad_image_is_one_error_line(checkpoints, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(
        monkeypatch, capsys, "chat", checkpoints["pmod"], "--image", tmp_path / "missing.png", "hi"
    )
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: image not found: {tmp_path / 'missing.png'}"]


def test_visualize_prints_the_answer_to_the_prompt_it_routed(checkpoints, tmp_path):
    result = visualize_routing(
        checkpoints["image"],
        checkpoint=checkpoints["pmod"],
        prompt="what is it?",
        output=tmp_path / "v.png",
        answer_tokens=8,
    )
    assert result.selection.answer == greedy_answer(
        checkpoints["pmod"], checkpoints["image"], "what is it?"
    )
    # the routing shown is the answer's prefill: layer 2 keeps floor(16 * 0.25) vision tokens
    assert result.selection.layers[2].kept_count == 4


def test_the_streamed_answer_starts_at_its_first_word(checkpoints):
    """A word-initial first token (" right") decodes with a leading space; the stream drops it, as
    the final answer does, and keeps every later space."""
    from pmod_cli.evaluation.chat import _CallbackStreamer

    tokenizer = load_checkpoint(checkpoints["dense"])[1].tokenizer
    answer = tokenizer(" right side up", add_special_tokens=False).input_ids
    assert tokenizer.decode(answer).startswith(" ")  # the case this test is about
    pieces = []
    streamer = _CallbackStreamer(tokenizer, pieces.append)
    streamer.put(torch.tensor([tokenizer("ASSISTANT:", add_special_tokens=False).input_ids]))
    for token in answer:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == "right side up"


@pytest.mark.parametrize(
    "layout,spec", [("llava", "pool:tokens=4"), ("next", "visionzip:dominant=6,contextual=3")]
)
def test_a_method_that_shortens_the_prompt_is_measured_against_the_images_own_tokens(layout, spec):
    """Pool and VisionZip leave fewer image placeholders in the prompt; the answer's V, its dense
    twin's KV cache and TFLOPs are still the images' own: those of the model without the method."""
    from pmod_cli.evaluation.chat import ChatSession

    model, processor = tiny_model("llama", layout)
    image = random_image(90, 40, 3)  # on LLaVA-NeXT a 3-crop grid, not the largest (5)
    plain = ChatSession(model, processor, [image], max_new_tokens=2).ask("what colour?")
    apply_method(model, spec)
    short = ChatSession(model, processor, [image], max_new_tokens=2).ask("what colour?")
    assert short.vision_tokens == plain.vision_tokens and short.text_tokens == plain.text_tokens
    assert short.dense_kv_cache_bytes == plain.kv_cache_bytes > short.kv_cache_bytes
    assert short.flops.baseline_tflops == plain.flops.tflops > short.flops.tflops
    if layout == "next":  # 3 crops of D + C tokens enter, as the cache shows
        entering = short.kv_cache_bytes * (plain.vision_tokens + plain.text_tokens)
        assert entering == plain.kv_cache_bytes * (plain.text_tokens + 3 * 9)
        assert short.flops.vision_crops == 3
