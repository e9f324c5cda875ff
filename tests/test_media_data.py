"""Several images and videos per sample: PyAV frames, placeholders, encoding as the processor does,
the same prompt in training and evaluation, batches equal to samples alone, the tiny media set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pmod_cli.data.llava_data import (
    IGNORE_INDEX,
    Collator,
    SampleEncoder,
    SkipSample,
    SupervisedDataset,
    load_records,
    scan_records,
)
from pmod_cli.data.media import generate
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.data.templates import CHAT_TEMPLATE, get_template
from pmod_cli.data.tiny_build import tiny_llava
from pmod_cli.data.video import VideoError, read_frames, write_video

CONVERSATION = [
    {"from": "human", "value": "<image>\n<image>\n<video>\nWhat changes?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "And then?"},
    {"from": "gpt", "value": "2"},
]


@pytest.fixture(scope="module")
def onevision():
    return tiny_llava("llava_onevision", layers=2, hidden=32, vision_hidden=32)


def image(width=80, height=60, colour=(200, 30, 30)):
    return Image.new("RGB", (width, height), colour)


def ramp_video(path, frames=10, size=56):
    """Frame f is a flat grey of level 25 f: which frame was sampled is readable from its pixels."""
    levels = np.arange(frames, dtype=np.uint8) * 25
    return write_video(
        path, np.broadcast_to(levels[:, None, None, None], (frames, size, size, 3)).copy()
    )


def test_frames_are_spread_over_the_whole_video(tmp_path):
    video = ramp_video(tmp_path / "ramp.mp4")
    frames = read_frames(video, 4)
    assert frames.shape == (4, 56, 56, 3) and frames.dtype == np.uint8
    # frames 0, 3, 6, 9 of levels 0, 75, 150, 225 (MPEG-4 is lossy by a few levels)
    assert np.abs(frames[:, 20, 20, 0].astype(int) - [0, 75, 150, 225]).max() <= 6
    # a video shorter than asked repeats frames: every video of a batch has as many frames
    assert read_frames(video, 16).shape[0] == 16
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    with pytest.raises(VideoError):
        read_frames(tmp_path / "bad.mp4", 4)


@pytest.mark.parametrize("template", ["chatml", CHAT_TEMPLATE])
def test_images_and_a_video_encode_as_the_eval_prompt(onevision, tmp_path, template):
    model, processor = onevision
    clip = read_frames(ramp_video(tmp_path / "ramp.mp4"), 4)
    encoder = SampleEncoder(
        processor, get_template(template) if template != CHAT_TEMPLATE else template, 1024
    )
    sample = encoder.encode(CONVERSATION, [image(), image(60, 90)], [clip])
    ids = sample.input_ids
    # two images of a several-image sample: one crop + a newline each; 4 frames of 2x2 + a newline
    assert int((ids == model.config.image_token_id).sum()) == 2 * (16 + 1)
    assert int((ids == model.config.video_token_id).sum()) == 4 * 4 + 1
    assert sample.vision_inputs["batch_num_images"].tolist() == [2]
    assert sample.vision_inputs["pixel_values_videos"].shape[:2] == (1, 4)
    supervised = processor.tokenizer.decode(sample.labels[sample.labels != IGNORE_INDEX])
    assert supervised.replace("\n", "") == "red<|im_end|>2<|im_end|>"
    # evaluation prompts the first question the way training formatted it
    prompt = build_prompt(processor, "What changes?", 2, "chatml", num_videos=1)
    prompt_ids = encode(processor, [prompt], [[image(), image(60, 90)]], model, videos=[clip])[
        "input_ids"
    ][0]
    assert torch.equal(ids[: len(prompt_ids)], prompt_ids)


def test_placeholders_for_videos(onevision, tmp_path):
    _, processor = onevision
    clip = read_frames(ramp_video(tmp_path / "ramp.mp4"), 2)
    encoder = SampleEncoder(processor, get_template("chatml"), 1024)
    video_token = processor.tokenizer.convert_tokens_to_ids("<video>")
    reply = {"from": "gpt", "value": "up"}
    # LLaVA-NeXT / OneVision video data mark the video with <image>
    marked = encoder.encode([{"from": "human", "value": "<image>\nWhich way?"}, reply], [], [clip])
    # or leave the placeholder out: the video leads the first turn
    unmarked = encoder.encode([{"from": "human", "value": "Which way?"}, reply], [], [clip])
    assert torch.equal(marked.input_ids, unmarked.input_ids)
    assert int((marked.input_ids == video_token).sum()) == 2 * 4 + 1
    with pytest.raises(SkipSample, match="2 <video> placeholders but 1 videos"):
        encoder.encode(
            [{"from": "human", "value": "<video><video>\nWhich way?"}, reply], [], [clip]
        )
    llava_processor = tiny_llava("llava", layers=1, hidden=32, vision_hidden=32)[1]
    with pytest.raises(SkipSample, match="does not take"):
        SampleEncoder(llava_processor, get_template("vicuna_v1"), 1024).encode(
            [reply | {"from": "human"}, reply], [], [clip]
        )


def test_a_collated_batch_gives_each_sample_its_logits_alone(onevision, tmp_path):
    model, processor = onevision
    clip = read_frames(ramp_video(tmp_path / "ramp.mp4"), 3)
    encoder = SampleEncoder(processor, get_template("chatml"), 1024)
    reply = {"from": "gpt", "value": "red"}
    samples = [
        encoder.encode(
            [{"from": "human", "value": "<image>\nOne?"}, reply], [image(110, 50)]
        ),  # anyres
        encoder.encode([{"from": "human", "value": "Text only."}, reply]),
        encoder.encode(CONVERSATION, [image(), image(60, 90)], [clip]),
        encoder.encode([{"from": "human", "value": "<video>\nWhich way?"}, reply], [], [clip]),
    ]
    batch = Collator(processor.tokenizer.pad_token_id)(
        [{**vars(s), "skipped": []} for s in samples]
    )
    assert batch["batch_num_images"].tolist() == [1, 2]
    assert batch["pixel_values"].shape[:2] == (
        3,
        max(
            s.vision_inputs["pixel_values"].shape[1]
            for s in samples
            if s.vision_inputs.get("pixel_values") is not None
        ),
    )
    batch.pop("num_skipped")
    with torch.no_grad():
        batched = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, sample in enumerate(samples):
            alone = model(input_ids=sample.input_ids[None], **sample.vision_inputs).logits[0]
            assert torch.allclose(batched[row, : len(sample.input_ids)], alone, atol=1e-5), row


def test_records_name_several_images_and_videos(tmp_path, onevision):
    _, processor = onevision
    ramp_video(tmp_path / "ok.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    image().save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\n<video>\nWhat?"}, {"from": "gpt", "value": "x"}]
    records = [
        {"id": "ok", "image": "a.png", "video": "ok.mp4", "conversations": turns},
        {
            "id": "missing",
            "video": ["ok.mp4", "gone.mp4"],
            "conversations": [{"from": "human", "value": "Two?"}, turns[1]],
        },
        {"id": "broken", "image": "a.png", "video": "broken.mp4", "conversations": turns},
        {"id": "bad-field", "image": "a.png", "video": {"path": "ok.mp4"}, "conversations": turns},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    scan = scan_records(load_records(path), tmp_path, max_bad_fraction=1.0)
    reasons = dict(scan.bad)
    assert scan.valid == [0] and scan.text_only == 0
    assert "gone.mp4 not found" in reasons["missing"]
    assert "unreadable" in reasons["broken"]
    assert "'video' is not a path" in reasons["bad-field"]
    dataset = SupervisedDataset(
        load_records(path),
        scan.valid,
        tmp_path,
        SampleEncoder(processor, get_template("chatml"), 512),
        video_frames=5,
    )
    assert dataset[0]["vision_inputs"]["pixel_values_videos"].shape[:2] == (1, 5)


def test_the_tiny_media_set_is_deterministic_and_every_sample_encodes(tmp_path, onevision):
    _, processor = onevision
    first, second = (
        generate(tmp_path / "a", train_samples=4, heldout_samples=2),
        generate(tmp_path / "b", train_samples=4, heldout_samples=2),
    )
    for name in ("sft_train.json", "heldout_video.json", "heldout_multi.json"):
        assert (first / name).read_text() == (second / name).read_text()
    records = load_records(first / "sft_train.json")
    scan = scan_records(records, first)
    assert len(scan.valid) == 12 and not scan.bad
    kinds = {record["id"].split("_")[0] for record in records}
    assert kinds == {"single", "pair", "video"}
    dataset = SupervisedDataset(
        records, scan.valid, first, SampleEncoder(processor, get_template("chatml"), 512)
    )
    for position in range(len(dataset)):
        assert dataset[position]["skipped"] == []
    held = json.loads((first / "heldout_video.json").read_text())
    assert all(sample["answer"] in sample["conversations"][1]["value"] for sample in held)


def test_a_chat_template_must_render_a_conversation_s_beginning_as_its_prefix(onevision):
    import copy

    _, processor = onevision
    processor = copy.copy(processor)
    # the number of messages up front: a longer conversation does not extend a shorter one
    processor.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['role'] }}: "
        "{% for item in m['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    encoder = SampleEncoder(processor, CHAT_TEMPLATE, 512)
    with pytest.raises(SkipSample, match="beginning as its prefix"):
        encoder.encode([{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "yes"}])


def test_group_by_modality_length_counts_a_video_sample_as_a_vision_sample():
    from pmod_cli.training.sampler import modality_lengths

    turns = [{"from": "human", "value": "what moves?"}, {"from": "gpt", "value": "a circle"}]
    rows = [
        {"conversations": turns, "video": "clip.mp4"},
        {"conversations": turns, "image": ["a.png", "b.png"]},
        {"conversations": turns, "image": None, "video": None},
    ]
    assert modality_lengths(rows, range(3)) == [4, 4, -4]
