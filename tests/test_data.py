"""Data: templates and label masking, image-token expansion, truncation, bad samples, the tiny assets."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PMOD_CACHE", str(ROOT / ".cache" / "pmod-tests"))

from pmod_cli.data import synthetic  # noqa: E402
from pmod_cli.data.llava_data import (  # noqa: E402
    IGNORE_INDEX,
    Collator,
    SampleEncoder,
    SkipSample,
    SupervisedDataset,
    load_records,
    scan_records,
)
from pmod_cli.data.templates import get_template, parse_turns  # noqa: E402
from pmod_cli.data.tiny import build_tokenizer, tiny_llava  # noqa: E402
from pmod_cli.errors import UserError  # noqa: E402

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is the square?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many circles are there?"},
    {"from": "gpt", "value": "2"},
]


@pytest.fixture(scope="module")
def llava_processor():
    return tiny_llava("llava", layers=2, hidden=32, vision_hidden=32)[1]


@pytest.fixture(scope="module")
def next_processor():
    return tiny_llava("llava_next", layers=2, hidden=32, vision_hidden=32)[1]


def image(width=112, height=112, colour=(200, 30, 30)):
    return Image.new("RGB", (width, height), colour)


def supervised_text(processor, sample) -> str:
    return processor.tokenizer.decode(sample.labels[sample.labels != IGNORE_INDEX])


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("vicuna_v1", " red</s> 2</s>"),
        ("chatml", "red<|im_end|>2<|im_end|>"),
        ("plain", "red\n"),  # pretrain: the first reply is the caption
    ],
)
def test_loss_only_on_assistant_replies(llava_processor, template, expected):
    encoder = SampleEncoder(llava_processor, get_template(template), max_length=1024)
    sample = encoder.encode(CONVERSATION, [image()])
    assert supervised_text(llava_processor, sample) == expected
    # the image is 8x8 = 64 features, never supervised
    is_image = sample.input_ids == encoder.image_token_id
    assert int(is_image.sum()) == 64
    assert bool((sample.labels[is_image] == IGNORE_INDEX).all())
    # labels are the input ids wherever they are supervised
    supervised = sample.labels != IGNORE_INDEX
    assert torch.equal(sample.labels[supervised], sample.input_ids[supervised])
    # the user's words never are
    if template != "plain":
        assert "colour" in llava_processor.tokenizer.decode(sample.input_ids)
        assert "colour" not in supervised_text(llava_processor, sample)


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_jinja_chat_template_builds_the_training_prompt(llava_processor, template):
    """The chat template saved with the processor gives the prompt the model was trained on."""
    spec = get_template(template)
    llava_processor.chat_template = spec.jinja
    question = "<image>\nWhat colour is the square?"
    rendered = llava_processor.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    assert rendered == spec.generation_prompt(question)
    structured = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    assert llava_processor.apply_chat_template(structured, add_generation_prompt=True) == rendered
    # a whole conversation renders as the training pieces do
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": "red"}]
    encoder = SampleEncoder(llava_processor, spec, 1024)
    pieces = spec.format(
        parse_turns([{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]), encoder.eos_token
    )
    assert llava_processor.apply_chat_template(turns).rstrip("\n") == "".join(p.text for p in pieces).rstrip("\n")


def test_truncation_never_cuts_image_tokens(llava_processor):
    encoder = SampleEncoder(llava_processor, get_template("vicuna_v1"), max_length=1024)
    full = encoder.encode(CONVERSATION, [image()])
    image_end = int((full.input_ids == encoder.image_token_id).nonzero().max()) + 1
    # room for the image and the first reply: the text is cut, the image intact
    first_reply_end = int((full.labels != IGNORE_INDEX).nonzero()[0]) + 3
    cut = SampleEncoder(llava_processor, get_template("vicuna_v1"), max_length=first_reply_end).encode(
        CONVERSATION, [image()]
    )
    assert cut.truncated and len(cut.input_ids) == first_reply_end
    assert int((cut.input_ids == encoder.image_token_id).sum()) == 64
    # a limit inside the image tokens skips the sample instead
    with pytest.raises(SkipSample, match="image tokens"):
        SampleEncoder(llava_processor, get_template("vicuna_v1"), max_length=image_end - 5).encode(
            CONVERSATION, [image()]
        )
    # a limit before any reply leaves nothing to learn
    with pytest.raises(SkipSample, match="no assistant reply"):
        SampleEncoder(llava_processor, get_template("vicuna_v1"), max_length=image_end + 2).encode(
            CONVERSATION, [image()]
        )


def test_anyres_token_counts_follow_the_processor(next_processor):
    encoder = SampleEncoder(next_processor, get_template("vicuna_v1"), max_length=1024)
    samples = [encoder.encode(CONVERSATION, [image(w, h)]) for w, h in ((112, 56), (56, 112), (112, 112))]
    for sample, (w, h) in zip(samples, ((112, 56), (56, 112), (112, 112)), strict=True):
        expected = next_processor(text="<image>", images=[image(w, h)], return_tensors="pt")["input_ids"]
        assert int((sample.input_ids == encoder.image_token_id).sum()) == int((expected == encoder.image_token_id).sum())
        assert sample.image_sizes.tolist() == [[h, w]]
    counts = {int((s.input_ids == encoder.image_token_id).sum()) for s in samples}
    assert len(counts) >= 2  # the count depends on the image's shape
    batch = Collator(next_processor.tokenizer.pad_token_id)(
        [{**vars(s), "skipped": []} for s in samples]
    )
    assert batch["pixel_values"].shape[:2] == (3, max(s.pixel_values.shape[1] for s in samples))
    assert batch["image_sizes"].shape == (3, 2)
    # right padding: real tokens first, then pad with labels -100
    lengths = [len(s.input_ids) for s in samples]
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    shortest = lengths.index(min(lengths))
    assert bool((batch["labels"][shortest, min(lengths):] == IGNORE_INDEX).all())


def test_text_only_samples_and_missing_placeholder(llava_processor):
    encoder = SampleEncoder(llava_processor, get_template("vicuna_v1"), max_length=1024)
    text_only = encoder.encode([{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}])
    assert text_only.pixel_values is None and supervised_text(llava_processor, text_only) == " hi</s>"
    # LLaVA data sometimes leaves <image> out: the image then leads the first turn
    no_placeholder = encoder.encode([{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "red"}], [image()])
    assert int((no_placeholder.input_ids == encoder.image_token_id).sum()) == 64
    batch = Collator(0)([{**vars(text_only), "skipped": []}, {**vars(no_placeholder), "skipped": ["x"]}])
    assert batch["pixel_values"].shape[0] == 1 and int(batch["num_skipped"]) == 1


def write_dataset(folder: Path, samples: list[dict], suffix=".json") -> Path:
    path = folder / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(s) for s in samples))
    else:
        path.write_text(json.dumps(samples))
    return path


def qa(sample_id, image_name=None):
    sample = {"id": sample_id, "conversations": [
        {"from": "human", "value": ("<image>\n" if image_name else "") + "What is it?"},
        {"from": "gpt", "value": "a square"},
    ]}
    if image_name:
        sample["image"] = image_name
    return sample


def test_bad_samples_are_named_counted_and_limited(tmp_path, caplog, llava_processor):
    image().save(tmp_path / "good.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    image().save(tmp_path / "truncated.png")
    data = (tmp_path / "truncated.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    samples = [qa(f"ok{i}", "good.png") for i in range(6)]
    samples += [qa("gone", "missing.png"), qa("junk", "not_an_image.png"), qa("cut", "truncated.png"), qa(7)]
    path = write_dataset(tmp_path, samples, suffix=".jsonl")
    records = load_records(path)

    with caplog.at_level(logging.WARNING):
        scan = scan_records(records, tmp_path, max_bad_fraction=0.5)
    assert {name for name, _ in scan.bad} == {"gone", "junk"}
    assert "skipping sample gone" in caplog.text and "missing.png not found" in caplog.text
    assert scan.text_only == 1 and len(scan.valid) == 8

    with pytest.raises(UserError, match=r"2 of 10 samples .* data.max_bad_fraction"):
        scan_records(records, tmp_path, max_bad_fraction=0.1)

    # an image that only fails to decode in full is replaced by the next sample, and counted
    dataset = SupervisedDataset(records, scan.valid, tmp_path, SampleEncoder(llava_processor, get_template("plain"), 512))
    cut_position = [records[i]["id"] for i in scan.valid].index("cut")
    item = dataset[cut_position]
    assert item["skipped"] == ["cut"] and item["pixel_values"] is None  # the text-only sample after it


def test_mixed_id_types_fall_back_to_plain_json(tmp_path):
    image().save(tmp_path / "a.png")
    samples = [qa(1, "a.png"), qa("two", "a.png"), {**qa(3), "image": ["a.png"]}]
    records = load_records(write_dataset(tmp_path, samples))
    assert [str(r["id"]) for r in records] == ["1", "two", "3"]
    assert len(scan_records(records, tmp_path).valid) == 3


def test_missing_data_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_records(tmp_path / "nope.json")


def test_synthetic_set_is_deterministic_and_scorable(tmp_path):
    first = synthetic.generate(tmp_path / "a", train_images=12, heldout_images=30)
    second = synthetic.generate(tmp_path / "b", train_images=12, heldout_images=30)
    for name in ("captions.json", "sft_train.json", "heldout.json"):
        assert (first / name).read_text() == (second / name).read_text()
    assert (first / "images/train/train_00003.png").read_bytes() == (second / "images/train/train_00003.png").read_bytes()
    heldout = json.loads((first / "heldout.json").read_text())
    assert all(" " not in r["answer"] and r["conversations"][1]["value"] == r["answer"] for r in heldout)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in heldout)
    sizes = {Image.open(first / "images" / r["image"]).size for r in heldout}
    assert len({w / h for w, h in sizes}) >= 3  # square, landscape and portrait images
    train = json.loads((first / "sft_train.json").read_text())
    assert {r["image"] for r in train}.isdisjoint({r["image"] for r in heldout})


def test_tiny_tokenizer_covers_any_text():
    tokenizer = build_tokenizer()
    text = "Ünïcode, emoji 🙂 and 中文 still tokenize"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    # the special tokens are single ids
    for token in ("<image>", "<|im_start|>", "<|im_end|>", "</s>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
