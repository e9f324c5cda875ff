"""Data: templates and label masking, image-token expansion, truncation, bad samples, the tiny assets."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from pmod_cli.data import llava_data, synthetic  # noqa: E402
from pmod_cli.data.cache import build_once, publish  # noqa: E402
from pmod_cli.data.llava_data import (  # noqa: E402
    IGNORE_INDEX,
    Collator,
    SampleEncoder,
    SkipSample,
    SupervisedDataset,
    check_record,
    load_image,
    load_records,
    scan_records,
)
from pmod_cli.data.prompts import build_prompt, content_items  # noqa: E402
from pmod_cli.data.templates import ConversationError, get_template, parse_turns  # noqa: E402
from pmod_cli.data.tiny_build import build_tokenizer, tiny_llava  # noqa: E402
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
@pytest.mark.parametrize(
    "question", ["<image>\nWhat colour is the square?", "What colour is the square?\n<image>"]
)
def test_jinja_chat_template_builds_the_training_prompt(llava_processor, template, question):
    """The chat template saved with the processor gives the prompt the model was trained on, with
    the image before the question (LLaVA's order) or after it."""
    spec = get_template(template)
    llava_processor.chat_template = spec.jinja
    rendered = llava_processor.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    assert rendered == spec.generation_prompt(question)
    structured = [{"role": "user", "content": content_items(question, "<image>")}]
    assert llava_processor.apply_chat_template(structured, add_generation_prompt=True) == rendered
    # the one prompt builder, given the question as the data places its image, agrees
    assert build_prompt(llava_processor, question, 1) == rendered
    # a whole conversation renders as the training pieces do
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": "red"}]
    encoder = SampleEncoder(llava_processor, spec, 1024)
    pieces = spec.format(
        parse_turns([{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]),
        encoder.eos_token,
    )
    assert llava_processor.apply_chat_template(turns).rstrip("\n") == "".join(
        p.text for p in pieces
    ).rstrip("\n")


def test_truncation_never_cuts_image_tokens(llava_processor):
    encoder = SampleEncoder(llava_processor, get_template("vicuna_v1"), max_length=1024)
    full = encoder.encode(CONVERSATION, [image()])
    image_end = int((full.input_ids == encoder.image_token_id).nonzero().max()) + 1
    # room for the image and the first reply: the text is cut, the image intact
    first_reply_end = int((full.labels != IGNORE_INDEX).nonzero()[0]) + 3
    cut = SampleEncoder(
        llava_processor, get_template("vicuna_v1"), max_length=first_reply_end
    ).encode(CONVERSATION, [image()])
    assert cut.truncated and len(cut.input_ids) == first_reply_end
    assert int((cut.input_ids == encoder.image_token_id).sum()) == 64
    # a limit inside the image tokens skips the sample instead
    with pytest.raises(SkipSample, match="vision tokens"):
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
    samples = [
        encoder.encode(CONVERSATION, [image(w, h)]) for w, h in ((112, 56), (56, 112), (112, 112))
    ]
    for sample, (w, h) in zip(samples, ((112, 56), (56, 112), (112, 112)), strict=True):
        expected = next_processor(text="<image>", images=[image(w, h)], return_tensors="pt")[
            "input_ids"
        ]
        assert int((sample.input_ids == encoder.image_token_id).sum()) == int(
            (expected == encoder.image_token_id).sum()
        )
        assert sample.vision_inputs["image_sizes"].tolist() == [[h, w]]
    counts = {int((s.input_ids == encoder.image_token_id).sum()) for s in samples}
    assert len(counts) >= 2  # the count depends on the image's shape
    batch = Collator(next_processor.tokenizer.pad_token_id)(
        [{**vars(s), "skipped": []} for s in samples]
    )
    assert batch["pixel_values"].shape[:2] == (
        3,
        max(s.vision_inputs["pixel_values"].shape[1] for s in samples),
    )
    assert batch["image_sizes"].shape == (3, 2)
    # right padding: real tokens first, then pad with labels -100
    lengths = [len(s.input_ids) for s in samples]
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    shortest = lengths.index(min(lengths))
    assert bool((batch["labels"][shortest, min(lengths) :] == IGNORE_INDEX).all())


def test_text_only_samples_and_missing_placeholder(llava_processor):
    encoder = SampleEncoder(llava_processor, get_template("vicuna_v1"), max_length=1024)
    text_only = encoder.encode(
        [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]
    )
    assert (
        text_only.vision_inputs == {} and supervised_text(llava_processor, text_only) == " hi</s>"
    )
    # LLaVA data sometimes leaves <image> out: the image then leads the first turn
    no_placeholder = encoder.encode(
        [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "red"}], [image()]
    )
    assert int((no_placeholder.input_ids == encoder.image_token_id).sum()) == 64
    batch = Collator(0)(
        [{**vars(text_only), "skipped": []}, {**vars(no_placeholder), "skipped": ["x"]}]
    )
    assert batch["pixel_values"].shape[0] == 1 and int(batch["num_skipped"]) == 1


def write_dataset(folder: Path, samples: list[dict], suffix=".json") -> Path:
    path = folder / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(s) for s in samples))
    else:
        path.write_text(json.dumps(samples))
    return path


def qa(sample_id, image_name=None):
    sample = {
        "id": sample_id,
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image_name else "") + "What is it?"},
            {"from": "gpt", "value": "a square"},
        ],
    }
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
    samples += [
        qa("gone", "missing.png"),
        qa("junk", "not_an_image.png"),
        qa("cut", "truncated.png"),
        qa(7),
    ]
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
    dataset = SupervisedDataset(
        records, scan.valid, tmp_path, SampleEncoder(llava_processor, get_template("plain"), 512)
    )
    cut_position = [records[i]["id"] for i in scan.valid].index("cut")
    item = dataset[cut_position]
    assert (
        item["skipped"] == ["cut"] and item["vision_inputs"] == {}
    )  # the text-only sample after it


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
    assert (first / "images/train/train_00003.png").read_bytes() == (
        second / "images/train/train_00003.png"
    ).read_bytes()
    heldout = json.loads((first / "heldout.json").read_text())
    assert all(
        " " not in r["answer"] and r["conversations"][1]["value"] == r["answer"] for r in heldout
    )
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


# ---- the tiny cache: concurrent builders -------------------------------------------------


def has_version(directory: Path) -> bool:
    return (directory / "VERSION").is_file()


def write_copy(directory: Path, content: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data.txt").write_text(content)
    (directory / "VERSION").write_text("1")


def test_a_late_builder_leaves_the_complete_copy_in_place(tmp_path):
    final = tmp_path / "asset"
    write_copy(final, "first")
    in_use = (final / "data.txt").stat().st_ino
    staging = tmp_path / ".asset-late"
    write_copy(staging, "second")
    publish(staging, final, has_version)
    assert (final / "data.txt").read_text() == "first" and (
        final / "data.txt"
    ).stat().st_ino == in_use
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]  # the late copy is discarded


def test_a_partial_copy_is_replaced_and_removed(tmp_path):
    final = tmp_path / "asset"
    final.mkdir()
    (final / "half.txt").write_text("crashed here")  # no VERSION
    staging = tmp_path / ".asset-new"
    write_copy(staging, "new")
    publish(staging, final, has_version)
    assert (final / "data.txt").read_text() == "new" and not (final / "half.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


def test_concurrent_builders_build_once_and_all_get_the_copy(tmp_path):
    final = tmp_path / "cache" / "asset"
    builds = []
    start = threading.Barrier(4)

    def build(directory: Path) -> None:
        builds.append(directory)
        time.sleep(0.2)  # the others arrive meanwhile
        write_copy(directory, "built")

    def worker() -> Path:
        start.wait()
        return build_once(final, has_version, build)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: worker(), range(4)))
    assert results == [final] * 4 and len(builds) == 1
    assert (final / "data.txt").read_text() == "built"
    assert not [
        p for p in final.parent.iterdir() if p.name.startswith(".asset-")
    ]  # no staging left


def test_synthetic_set_counts_as_built_only_at_its_version(tmp_path):
    write_copy(tmp_path / "shapes", "x")
    assert not synthetic._is_current(tmp_path / "shapes")  # VERSION 1 is an older set
    (tmp_path / "shapes" / "VERSION").write_text(str(synthetic.SYNTHETIC_VERSION))
    assert synthetic.ensure_synthetic(tmp_path / "shapes") == tmp_path / "shapes"  # used as it is


# ---- LLaVA / FastChat conversations --------------------------------------------------------


def test_leading_assistant_and_trailing_user_turns_are_dropped_in_training():
    greeting = {"from": "gpt", "value": "Hello! Ask me about the image."}
    unanswered = {"from": "human", "value": "And the triangle?"}
    turns = parse_turns([greeting, *CONVERSATION, unanswered])
    assert [(t.role, t.text) for t in turns] == [
        ("user", "<image>\nWhat colour is the square?"),
        ("assistant", "red"),
        ("user", "How many circles are there?"),
        ("assistant", "2"),
    ]
    with pytest.raises(ConversationError, match="no user turn followed by an assistant reply"):
        parse_turns([CONVERSATION[0]])
    # questions to answer: a question alone is a conversation
    assert [t.role for t in parse_turns([CONVERSATION[0]], require_reply=False)] == ["user"]
    with pytest.raises(ConversationError, match="turn 1 is from the user"):
        parse_turns([CONVERSATION[0], CONVERSATION[2], CONVERSATION[1]])


def test_plain_keeps_the_images_of_later_turns(llava_processor):
    encoder = SampleEncoder(llava_processor, get_template("plain"), max_length=1024)
    conversation = [
        *CONVERSATION[:2],
        {"from": "human", "value": "<image>\nAnd this one?"},
        {"from": "gpt", "value": "blue"},
    ]
    sample = encoder.encode(conversation, [image(), image(colour=(0, 0, 200))])
    assert int((sample.input_ids == encoder.image_token_id).sum()) == 2 * 64
    assert sample.vision_inputs["pixel_values"].shape[0] == 2
    assert supervised_text(llava_processor, sample) == "red\n"


# ---- one tokenization per sample: a SentencePiece-style tokenizer --------------------------


def metaspace_tokenizer():
    """A tiny Llama-style tokenizer: BPE over Metaspace pieces, prepend_scheme "first", <s> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pmod_cli.data.templates import VICUNA_SYSTEM

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # trained on words (no merge across a word start), used like Llama's: no split at spaces
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=True
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        show_progress=False,
    )
    corpus = [VICUNA_SYSTEM, *(turn["value"] for turn in CONVERSATION), "USER: ASSISTANT:"]
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def test_a_sample_is_tokenized_as_one_text_like_the_eval_prompt(llava_processor):
    from transformers import LlavaProcessor

    tokenizer = metaspace_tokenizer()
    template = get_template("vicuna_v1")
    processor = LlavaProcessor(
        image_processor=llava_processor.image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template.jinja,
    )
    encoder = SampleEncoder(processor, template, max_length=1024)
    sample = encoder.encode(CONVERSATION, [image()])

    pieces = template.format(parse_turns(CONVERSATION), "</s>")
    full_text = "".join(p.text for p in pieces).replace("<image>", "<image>" * 64)
    assert sample.input_ids.tolist() == tokenizer(full_text)["input_ids"]
    assert tokenizer.unk_token_id not in sample.input_ids.tolist()
    # the labels: exactly the reply tokens " red</s>" and " 2</s>", no stray word-start piece
    supervised = sample.labels != IGNORE_INDEX
    assert tokenizer.convert_ids_to_tokens(sample.labels[supervised].tolist()) == [
        "▁red",
        "</s>",
        "▁2",
        "</s>",
    ]
    assert torch.equal(sample.labels[supervised], sample.input_ids[supervised])
    # the evaluation prompt (the chat template, through the processor) is the sample's beginning
    prompt = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "What colour is the square?"},
                ],
            }
        ],
        add_generation_prompt=True,
    )
    prompt_ids = processor(text=[prompt], images=[image()], return_tensors="pt")["input_ids"][0]
    assert torch.equal(sample.input_ids[: len(prompt_ids)], prompt_ids)


def test_byte_level_samples_are_one_tokenization_too(llava_processor):
    encoder = SampleEncoder(llava_processor, get_template("chatml"), max_length=1024)
    sample = encoder.encode(CONVERSATION, [image()])
    pieces = get_template("chatml").format(parse_turns(CONVERSATION), encoder.eos_token)
    full_text = "".join(p.text for p in pieces).replace("<image>", "<image>" * 64)
    assert sample.input_ids.tolist() == llava_processor.tokenizer(full_text)["input_ids"]


# ---- bad samples: each counted once, all bad is an error -----------------------------------


def truncated_png(path: Path) -> None:
    image().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not


def test_consecutive_bad_samples_are_counted_once_each(tmp_path, caplog, llava_processor):
    image().save(tmp_path / "good.png")
    truncated_png(tmp_path / "cut.png")
    samples = [
        qa("ok0", "good.png"),
        qa("cut1", "cut.png"),
        qa("cut2", "cut.png"),
        qa("cut3", "cut.png"),
        qa("ok4", "good.png"),
    ]
    records = load_records(write_dataset(tmp_path, samples))
    scan = scan_records(records, tmp_path, max_bad_fraction=0.0)  # the header check passes them
    dataset = SupervisedDataset(
        records, scan.valid, tmp_path, SampleEncoder(llava_processor, get_template("plain"), 512)
    )
    with caplog.at_level(logging.WARNING):
        items = [dataset[position] for position in range(len(dataset))]
    assert [name for item in items for name in item["skipped"]] == ["cut1", "cut2", "cut3"]
    assert int(Collator(0)(items)["num_skipped"]) == 3
    assert caplog.text.count("skipping sample cut2") == 1


def test_an_all_bad_data_set_gives_up_after_a_bounded_search(
    tmp_path, monkeypatch, llava_processor
):
    truncated_png(tmp_path / "cut.png")
    records = load_records(write_dataset(tmp_path, [qa(f"cut{i}", "cut.png") for i in range(20)]))
    dataset = SupervisedDataset(
        records, range(20), tmp_path, SampleEncoder(llava_processor, get_template("plain"), 512)
    )
    monkeypatch.setattr(llava_data, "MAX_REPLACEMENT_TRIES", 3)
    calls = []
    encode_index = dataset.encode_index
    monkeypatch.setattr(
        dataset, "encode_index", lambda position: calls.append(position) or encode_index(position)
    )
    with pytest.raises(UserError, match=r"sample cut5 and the 3 after it fail to encode"):
        dataset[5]
    assert calls == [5, 6, 7, 8]


def test_no_usable_sample_is_a_user_error_before_training(tmp_path, llava_processor):
    records = load_records(write_dataset(tmp_path, [qa(f"s{i}", f"{i}.png") for i in range(3)]))
    scan = scan_records(records, tmp_path / "wrong_folder", max_bad_fraction=1.0)
    assert scan.valid == []
    with pytest.raises(UserError, match="none of the 3 samples is usable"):
        SupervisedDataset(
            records,
            scan.valid,
            tmp_path,
            SampleEncoder(llava_processor, get_template("plain"), 512),
        )


def test_pil_errors_beyond_oserror_make_a_bad_sample(tmp_path, monkeypatch, caplog):
    image().save(tmp_path / "big.png")
    records = load_records(write_dataset(tmp_path, [qa("big", "big.png"), qa("text")]))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 112x112 is a decompression bomb now
    with caplog.at_level(logging.WARNING):
        scan = scan_records(records, tmp_path, max_bad_fraction=1.0)
    assert scan.bad == [
        ("big", f"image {tmp_path / 'big.png'} is unreadable (DecompressionBombError)")
    ]
    assert "skipping sample big" in caplog.text
    with pytest.raises(SkipSample, match="DecompressionBombError"):
        load_image(tmp_path / "big.png")

    def broken(*args, **kwargs):
        raise SyntaxError("broken PNG file")

    monkeypatch.setattr(llava_data.Image, "open", broken)
    with pytest.raises(SkipSample, match="unreadable .SyntaxError"):
        load_image(tmp_path / "big.png")


@pytest.mark.parametrize("bad_image", [5, {"path": "a.png"}, ["a.png", 3]])
def test_an_image_field_that_is_not_paths_makes_a_bad_sample(tmp_path, bad_image):
    image().save(tmp_path / "a.png")
    samples = [qa("good", "a.png"), {**qa("odd"), "image": bad_image}]
    records = load_records(write_dataset(tmp_path, samples))
    scan = scan_records(records, tmp_path, max_bad_fraction=1.0)
    assert len(scan.valid) == 1
    [(name, reason)] = scan.bad
    assert name == "odd" and "'image' is not a path or a list of paths" in reason
    # records given as they are (not read from a file) too
    with pytest.raises(SkipSample, match="not a path or a list of paths"):
        check_record({**qa("odd"), "image": bad_image}, tmp_path)


def test_a_tokenizer_without_offsets_gives_the_same_sample(llava_processor):
    class WithoutOffsets:  # a slow (Python) tokenizer's answer to return_offsets_mapping
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, text, **kwargs):
            if kwargs.get("return_offsets_mapping"):
                raise NotImplementedError(
                    "return_offset_mapping is not available when using Python tokenizers"
                )
            return self.tokenizer(text, **kwargs)

    encoder = SampleEncoder(llava_processor, get_template("vicuna_v1"), max_length=1024)
    expected = encoder.encode(CONVERSATION, [image()])
    encoder.tokenizer = WithoutOffsets(encoder.tokenizer)
    sample = encoder.encode(CONVERSATION, [image()])
    assert torch.equal(sample.input_ids, expected.input_ids) and torch.equal(
        sample.labels, expected.labels
    )
