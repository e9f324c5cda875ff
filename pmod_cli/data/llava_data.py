"""LLaVA-format training data: read, check, encode, collate.

    records = load_records("llava_v1_5_mix665k.json")            # JSON or JSONL, via `datasets`
    scan = scan_records(records, image_folder, max_bad_fraction)  # drops bad samples, with warnings
    dataset = SupervisedDataset(records, scan.valid, image_folder, SampleEncoder(processor, template, 2048))
    batch = Collator(pad_token_id)([dataset[0], dataset[1]])

A sample is ``{"id", "image" (a path, a list of paths, or absent), "video" (the same), "conversations":
[{"from": "human"|"gpt", "value": ...}]}`` with ``<image>`` where each image goes and ``<video>``
where each video goes (a sample with videos and no image may mark them ``<image>``, as the
LLaVA-NeXT / OneVision video data do). Encoding formats the conversation with a template, runs the
sample's images and sampled video frames through the HF processor in one call (so OneVision treats
several images as several images, and anyres counts depend on the image size), expands each
placeholder into the number of vision tokens the processor gives it, tokenizes the whole text at
once, as the processor does at evaluation time (labels -100 except on the tokens of assistant
replies), and truncates at ``max_length`` without ever cutting into vision tokens (such a sample
is skipped).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import UserError
from ..model.families import family_for_processor
from .prompts import chat_template_pieces
from .templates import (
    CHAT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    ConversationError,
    ConversationTemplate,
    Piece,
    Turn,
    media_placeholders,
    parse_turns,
)
from .video import VideoError, check_video, read_frames

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# samples named one by one in warnings; the rest are counted
MAX_NAMED_WARNINGS = 50
# how many samples after a failed one SupervisedDataset tries before giving up
MAX_REPLACEMENT_TRIES = 100
# what PIL raises on a bad image file: not only OSError (a decompression bomb, broken chunks)
PIL_ERRORS = (
    UnidentifiedImageError,
    OSError,
    Image.DecompressionBombError,
    ValueError,
    SyntaxError,
)
# set by _read_json_normalised where a sample's "image" or "video" field is neither a path nor a list of paths
IMAGE_ERROR_FIELD = "image_error"
MEDIA_FIELDS = ("image", "video")
# frames sampled from each video when the recipe does not say (data.video_frames)
DEFAULT_VIDEO_FRAMES = 8
UTF8_BOM = b"\xef\xbb\xbf"


class SkipSample(Exception):
    """This sample cannot be used; the message says why."""


# ---- reading ------------------------------------------------------------------------------


def load_records(path: str | Path):
    """A LLaVA JSON (a list of samples) or JSONL file as a ``datasets.Dataset``."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"data file {path} does not exist; set data.path to a LLaVA JSON or JSONL file"
        )
    try:
        records = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception:  # noqa: BLE001 - mixed-type fields (LLaVA-665K's ids) defeat arrow's schema
        records = datasets.Dataset.from_list(_read_json_normalised(path))
    if "conversations" not in records.column_names:
        raise UserError(f"{path} has no 'conversations' field; expected LLaVA JSON samples")
    return records


def read_utf8(path: Path) -> str:
    """The file's text; a UserError naming the first byte that is not UTF-8 (Latin-1 text, a
    surrogate encoded as bytes) and where it is."""
    data = path.read_bytes()
    bom = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        # 0xED 0xA0-0xBF starts a UTF-16 surrogate written as bytes, which UTF-8 forbids
        surrogate = (
            data[offset] == 0xED and offset + 1 < len(data) and 0xA0 <= data[offset + 1] <= 0xBF
        )
        reason = "a lone UTF-16 surrogate written as bytes" if surrogate else err.reason
        raise UserError(
            f"{path} is not UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}, column {column}), "
            f"{reason}; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_json_normalised(path: Path) -> list[dict[str, Any]]:
    text = read_utf8(path)
    try:
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"cannot parse {path} as JSON: {err}") from None
    if not isinstance(items, list):
        raise UserError(f"{path} must hold a list of samples (or one sample per line for .jsonl)")
    records = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{path}: sample {index} is not a JSON object")
        # one schema for arrow: ids as strings, images and videos as lists of strings (any other
        # "image" or "video" is kept out of the schema and makes the sample a bad one)
        problems = [_media_field_problem(item.get(name), name) for name in MEDIA_FIELDS]
        problem = next((text for text in problems if text), None)
        record = {"id": str(item.get("id", index)), "conversations": item.get("conversations")}
        for name in MEDIA_FIELDS:
            value = item.get(name)
            record[name] = None if problem else [value] if isinstance(value, str) else value
        record[IMAGE_ERROR_FIELD] = problem
        records.append(record)
    return records


def _media_field_problem(paths: Any, name: str = "image") -> str | None:
    if paths is None or isinstance(paths, str):
        return None
    if isinstance(paths, list) and all(isinstance(path, str) for path in paths):
        return None
    shown = json.dumps(paths, default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"its {name!r} is not a path or a list of paths: {shown}"


def sample_id(record: dict[str, Any], index: int) -> str:
    value = record.get("id")
    return str(value) if value is not None else f"#{index}"


def media_paths(record: dict[str, Any], image_folder: Path, name: str = "image") -> list[Path]:
    """The sample's image (``name="image"``) or video files; SkipSample if the field is neither a
    path nor a list of paths. Relative paths are relative to ``image_folder``."""
    paths = record.get(name)
    problem = record.get(IMAGE_ERROR_FIELD) or _media_field_problem(paths, name)
    if problem:
        raise SkipSample(problem)
    if paths is None or paths == "" or paths == []:
        return []
    if isinstance(paths, str):
        paths = [paths]
    return [Path(p) if Path(p).is_absolute() else image_folder / p for p in paths]


def image_paths(record: dict[str, Any], image_folder: Path) -> list[Path]:
    """The sample's image files (see ``media_paths``)."""
    return media_paths(record, image_folder, "image")


def video_paths(record: dict[str, Any], image_folder: Path) -> list[Path]:
    """The sample's video files (see ``media_paths``)."""
    return media_paths(record, image_folder, "video")


def place_media(turns: list[Turn], num_images: int, num_videos: int) -> list[Turn]:
    """The turns with one placeholder per image and per video, or SkipSample.

    A sample with videos but no image and no ``<video>`` placeholder marks its videos ``<image>``
    (LLaVA-NeXT / OneVision video data): those become ``<video>``. Images or videos without a
    placeholder lead the first turn (LLaVA data sometimes leaves it out).
    """
    text = "".join(turn.text for turn in turns)
    if num_videos and not num_images and VIDEO_PLACEHOLDER not in text:
        turns = [
            Turn(turn.role, turn.text.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER))
            for turn in turns
        ]
        text = text.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
    missing = []
    for placeholder, count, what in (
        (IMAGE_PLACEHOLDER, num_images, "images"),
        (VIDEO_PLACEHOLDER, num_videos, "videos"),
    ):
        placed = text.count(placeholder)
        if placed > count:
            raise SkipSample(f"{placed} {placeholder} placeholders but {count} {what}")
        missing += [placeholder] * (count - placed)
    if missing:
        turns = [
            Turn(turns[0].role, "".join(f"{p}\n" for p in missing) + turns[0].text),
            *turns[1:],
        ]
    return turns


# ---- checking -----------------------------------------------------------------------------


@dataclass
class ScanResult:
    """What a pass over the records found: the usable indices and the bad samples."""

    total: int
    valid: list[int]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)
    text_only: int = 0

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0


def check_record(record: dict[str, Any], image_folder: Path, open_images: bool = True) -> None:
    """Raise SkipSample if the record is malformed or one of its images is missing or unreadable."""
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        raise SkipSample("no 'conversations' list")
    try:
        turns = parse_turns(conversations)
    except ConversationError as err:
        raise SkipSample(str(err)) from None
    paths, videos = image_paths(record, image_folder), video_paths(record, image_folder)
    place_media(turns, len(paths), len(videos))
    for path in paths:
        if not path.is_file():
            raise SkipSample(f"image {path} not found")
        if open_images:
            try:
                with Image.open(path) as image:
                    image.size  # noqa: B018 - reads the header
            except PIL_ERRORS as err:
                raise SkipSample(f"image {path} is unreadable ({err.__class__.__name__})") from None
    for path in videos:
        if not path.is_file():
            raise SkipSample(f"video {path} not found")
        if open_images:
            _check_video_header(path)


def _check_video_header(path: Path) -> None:
    try:
        check_video(path)
    except VideoError as err:
        raise SkipSample(f"video {path} is unreadable ({err})") from None


def scan_records(
    records,
    image_folder: str | Path,
    max_bad_fraction: float = 0.01,
    open_images: bool = True,
    progress: bool = True,
) -> ScanResult:
    """Check every record; warn about (and drop) bad ones; UserError if too many are bad."""
    image_folder = Path(image_folder)
    result = ScanResult(total=len(records), valid=[])
    iterator = enumerate(records)
    if progress and len(records) > 5000:
        from rich.progress import track

        iterator = track(
            iterator, total=len(records), description="checking samples", transient=True
        )
    for index, record in iterator:
        try:
            check_record(record, image_folder, open_images)
        except SkipSample as reason:
            result.bad.append((sample_id(record, index), str(reason)))
            if len(result.bad) <= MAX_NAMED_WARNINGS:
                logger.warning("skipping sample %s: %s", sample_id(record, index), reason)
            continue
        result.valid.append(index)
        result.text_only += not (
            image_paths(record, image_folder) or video_paths(record, image_folder)
        )
    if len(result.bad) > MAX_NAMED_WARNINGS:
        logger.warning("... and %d more bad samples", len(result.bad) - MAX_NAMED_WARNINGS)
    if result.total == 0:
        raise UserError("the data file holds no samples")
    if result.bad_fraction > max_bad_fraction:
        first_id, first_reason = result.bad[0]
        raise UserError(
            f"{len(result.bad)} of {result.total} samples ({result.bad_fraction:.1%}) are bad, more than "
            f"data.max_bad_fraction = {max_bad_fraction:g} (first: {first_id}: {first_reason}); "
            "fix data.path / data.image_folder or raise data.max_bad_fraction"
        )
    return result


def find_load_failures(
    records,
    indices: Sequence[int],
    image_folder: str | Path,
    encoder: SampleEncoder | None = None,
    progress: bool = True,
    video_frames: int = DEFAULT_VIDEO_FRAMES,
) -> list[tuple[str, str]]:
    """(sample id, reason) of the samples among ``indices`` that training would skip while
    loading them: every image decoded in full (a file cut short passes the header check of
    ``scan_records``), every video's ``video_frames`` frames decoded, and, given the ``encoder``,
    the sample encoded as training encodes it (vision tokens or the whole answer past
    ``data.max_length``). Slow: one pass of data loading."""
    image_folder = Path(image_folder)
    iterator = iter(indices)
    if progress and len(indices) > 200:
        from rich.progress import track

        iterator = track(
            iterator, total=len(indices), description="loading every sample", transient=True
        )
    failures = []
    for index in iterator:
        record = records[index]
        try:
            images = [load_image(path) for path in image_paths(record, image_folder)]
            videos = [load_video(path, video_frames) for path in video_paths(record, image_folder)]
            if encoder is not None:
                encoder.encode(record["conversations"], images, videos, with_pixels=False)
        except SkipSample as reason:
            failures.append((sample_id(record, index), str(reason)))
    return failures


# ---- encoding -----------------------------------------------------------------------------


@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # (seq,) long
    labels: torch.Tensor  # (seq,) long, IGNORE_INDEX outside assistant replies
    # the processor's pixel inputs: pixel_values (images[, crops], 3, H, W), image_sizes,
    # batch_num_images, pixel_values_videos (videos, frames, 3, H, W), ...; empty for text only
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    truncated: bool = False


class SampleEncoder:
    """Formats, tokenizes and masks one sample for a given processor and template.

    The formatted text, each ``<image>`` / ``<video>`` expanded into the processor's vision tokens,
    is tokenized in one call, as the processor tokenizes a prompt at evaluation time: tokenizing
    pieces one by one would not give the same ids (a SentencePiece tokenizer starts every piece
    with a word boundary). The labels are the ids of the tokens that start inside an assistant
    reply, found from the tokens' character offsets.

    ``template`` is a conversation template, or ``CHAT_TEMPLATE``: the processor's own chat template
    (else its tokenizer's), the one ``build_prompt`` uses at inference.
    """

    def __init__(self, processor, template: ConversationTemplate | str, max_length: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.max_length = max_length
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = getattr(processor, "video_token", None)
        self.video_token_id = (
            self.tokenizer.convert_tokens_to_ids(self.video_token) if self.video_token else None
        )
        self.vision_token_ids = {self.image_token_id} | (
            {self.video_token_id} if self.video_token else set()
        )
        self.eos_token = self.tokenizer.eos_token or ""
        self._counts_by_size: dict[tuple[int, int], int] = {}
        # how the processor's family writes an image / a video into the text (Qwen-VL: inside
        # its vision markers); None: the processor's token, repeated
        self.family = family_for_processor(processor)

    def image_token_count(self, image: Image.Image) -> int:
        """The image tokens the processor gives ``image``; it depends on the image's size only
        (anyres picks the grid from it), so it is worked out once per size."""
        if image.size not in self._counts_by_size:
            out = self.processor(
                text=self.processor.image_token, images=[image], return_tensors="pt"
            )
            self._counts_by_size[image.size] = int((out["input_ids"] == self.image_token_id).sum())
        return self._counts_by_size[image.size]

    def vision_inputs(self, images: Sequence[Image.Image], videos: Sequence[np.ndarray]):
        """The vision tokens of each image and each video (by placeholder), and the processor's
        pixel inputs, from one processor call for the whole sample: OneVision lays out an image
        alone (anyres) and one of several (one crop) differently."""
        counts: dict[str, list[int]] = {IMAGE_PLACEHOLDER: [], VIDEO_PLACEHOLDER: []}
        if not images and not videos:
            return counts, {}
        if videos and not self.video_token:
            raise SkipSample(f"it has a video, which {type(self.processor).__name__} does not take")
        placeholders = [self.image_token] * len(images) + [self.video_token] * len(videos)
        out = self.processor(
            text="\n".join(placeholders),  # separated: the token runs of two images never touch
            images=[list(images)] if images else None,
            videos=list(videos) if videos else None,
            return_tensors="pt",
        )
        ids = out["input_ids"][0].tolist()
        counts[IMAGE_PLACEHOLDER] = _runs(ids, self.image_token_id) if images else []
        counts[VIDEO_PLACEHOLDER] = _runs(ids, self.video_token_id) if videos else []
        # a processor that writes text between a video's tokens (Qwen3-VL: a timestamp before
        # each temporal patch) gives its own text of each video
        video_texts = self.family.video_texts(self.processor, videos) if self.family else None
        if video_texts is not None:
            counts[VIDEO_PLACEHOLDER] = [text.count(self.video_token) for text in video_texts]
        # token-level outputs (mm_token_type_ids) are made again for the whole text by the collator
        vision = {
            key: value
            for key, value in out.items()
            if key not in ("input_ids", "attention_mask", "mm_token_type_ids")
        }
        if video_texts is not None:
            vision["video_texts"] = video_texts  # taken out again by encode
        return counts, vision

    def render(
        self,
        pieces: Sequence[Piece],
        counts: dict[str, Sequence[int]],
        video_texts: Sequence[str] | None = None,
    ) -> tuple[str, list[tuple[int, int]]]:
        """The text of the pieces, the i-th ``<image>`` (``<video>``) expanded to
        ``counts["<image>"][i]`` image (video) tokens (or to the processor's ``video_texts[i]``),
        and the (start, end) character spans of the target pieces."""
        expansions = {IMAGE_PLACEHOLDER: self.image_token, VIDEO_PLACEHOLDER: self.video_token}
        used = dict.fromkeys(counts, 0)
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0
        for piece in pieces:
            text = ""
            for segment in _PLACEHOLDER_SPLIT.split(piece.text):
                if segment in expansions:
                    index = used[segment]
                    own = (
                        video_texts[index] if video_texts and segment == VIDEO_PLACEHOLDER else None
                    )
                    text += self._expand(segment, expansions[segment], counts[segment][index], own)
                    used[segment] += 1
                else:
                    text += segment
            if piece.is_target and text:
                spans.append((length, length + len(text)))
            parts.append(text)
            length += len(text)
        return "".join(parts), spans

    def _with_data_placeholders(self, text: str) -> str:
        """``text`` with the family's own image / video placeholders (a chat template writes them,
        Qwen-VL: ``<|vision_start|><|image_pad|><|vision_end|>``) back as ``<image>`` / ``<video>``."""
        if self.family is None:
            return text
        for kind, placeholder in (("image", IMAGE_PLACEHOLDER), ("video", VIDEO_PLACEHOLDER)):
            own = self.family.media_placeholder(self.processor, kind)
            if own != placeholder:
                text = text.replace(own, placeholder)
        return text

    def _expand(self, placeholder: str, token: str, count: int, own: str | None = None) -> str:
        """One image's / video's text: ``count`` vision tokens (or the processor's ``own`` text),
        as its family writes them."""
        if self.family is None:
            return own or token * count
        kind = "image" if placeholder == IMAGE_PLACEHOLDER else "video"
        return self.family.media_expansion(self.processor, kind, count, own)

    def tokenize(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """The ids of ``text`` (with the tokenizer's own special tokens, e.g. Llama's <s>) and, per
        token, whether it starts inside one of ``spans``."""
        try:
            # verbose=False: no warning about texts past the tokenizer's model_max_length, cut here
            encoded = self.tokenizer(
                text, add_special_tokens=True, return_offsets_mapping=True, verbose=False
            )
        except NotImplementedError:  # a slow (Python) tokenizer has no offsets
            return self._tokenize_by_prefixes(text, spans)
        ids = list(encoded["input_ids"])
        targets = []
        span_index = 0
        for start, end in encoded["offset_mapping"]:
            if start == end:  # added by the tokenizer (<s>), not from the text
                targets.append(False)
                continue
            while span_index < len(spans) and spans[span_index][1] <= start:
                span_index += 1
            targets.append(span_index < len(spans) and spans[span_index][0] <= start)
        return ids, targets

    def _tokenize_by_prefixes(
        self, text: str, spans: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[bool]]:
        # token i is a target if it lies between the token counts of the text up to a span's ends
        ids = list(self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
        targets = [False] * len(ids)
        for start, end in spans:
            first = len(
                self.tokenizer(text[:start], add_special_tokens=True, verbose=False)["input_ids"]
            )
            last = len(
                self.tokenizer(text[:end], add_special_tokens=True, verbose=False)["input_ids"]
            )
            targets[first:last] = [True] * (last - first)
        return ids, targets

    def pieces(self, turns: list[Turn]) -> list[Piece]:
        """The conversation as text pieces, assistant replies marked as targets."""
        if self.template == CHAT_TEMPLATE:
            try:
                return chat_template_pieces(self.processor, turns)
            except ConversationError as err:
                raise SkipSample(str(err)) from None
        return self.template.format(turns, self.eos_token)

    def encode(
        self,
        conversations: list[dict],
        images: Sequence[Image.Image] = (),
        videos: Sequence[np.ndarray] = (),
        with_pixels: bool = True,
    ) -> EncodedSample:
        """The sample's ids and labels (and pixel values, unless ``with_pixels`` is false: a
        check of what training would keep needs only the token counts)."""
        try:
            turns = place_media(parse_turns(conversations), len(images), len(videos))
        except ConversationError as err:
            raise SkipSample(str(err)) from None
        if with_pixels or videos or len(images) > 1:
            counts, vision_inputs = self.vision_inputs(images, videos)
        else:  # one image alone: its count depends on its size only (cached), no pixels needed
            counts = {IMAGE_PLACEHOLDER: [self.image_token_count(image) for image in images]}
            counts[VIDEO_PLACEHOLDER] = []
            vision_inputs = {}
        video_texts = vision_inputs.pop("video_texts", None)
        if not with_pixels:
            vision_inputs = {}
        pieces = [
            Piece(self._with_data_placeholders(piece.text), piece.is_target)
            for piece in self.pieces(turns)
        ]
        placed = [p for piece in pieces for p in media_placeholders(piece.text)]
        if placed.count(IMAGE_PLACEHOLDER) != len(images) or placed.count(VIDEO_PLACEHOLDER) != len(
            videos
        ):
            name = getattr(self.template, "name", self.template)
            raise SkipSample(
                f"the {name} template does not place all of its {len(images)} images and {len(videos)} videos"
            )
        text, spans = self.render(pieces, counts, video_texts)
        ids, targets = self.tokenize(text, spans)
        is_vision = [token in self.vision_token_ids for token in ids]
        expected = sum(counts[IMAGE_PLACEHOLDER]) + sum(counts[VIDEO_PLACEHOLDER])
        if sum(is_vision) != expected:
            raise SkipSample(
                f"{sum(is_vision)} vision tokens in the tokenized text, expected {expected} "
                f"(does its text hold {self.image_token!r} itself?)"
            )
        labels = [
            token if target and not vision else IGNORE_INDEX
            for token, target, vision in zip(ids, targets, is_vision, strict=True)
        ]
        ids, labels, truncated = self._truncate(ids, labels, is_vision)
        return EncodedSample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            vision_inputs=vision_inputs,
            truncated=truncated,
        )

    def _truncate(
        self, ids: list[int], labels: list[int], is_vision: list[bool]
    ) -> tuple[list[int], list[int], bool]:
        """Cut at ``max_length``, never into vision tokens; SkipSample if nothing is left to learn."""
        vision_end = max(
            (position + 1 for position, vision in enumerate(is_vision) if vision), default=0
        )
        truncated = len(ids) > self.max_length
        if truncated:
            if vision_end > self.max_length:
                raise SkipSample(
                    f"its vision tokens end at {vision_end}, past data.max_length {self.max_length}"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample(
                "no assistant reply left to train on (empty, or cut by data.max_length)"
            )
        return ids, labels, truncated


_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def _runs(ids: list[int], token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id`` in ``ids``."""
    runs: list[int] = []
    previous = None
    for token in ids:
        if token == token_id:
            if previous == token_id:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = token
    return runs


def load_image(path: Path) -> Image.Image:
    """The image as RGB; a truncated file is a bad sample even where another library (lmms-eval
    does, on import) has told PIL to fill truncated images with grey."""
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except PIL_ERRORS as err:
        raise SkipSample(f"image {path} is unreadable ({err.__class__.__name__}: {err})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def load_video(path: Path, num_frames: int) -> np.ndarray:
    """``num_frames`` frames spread over the video (``data/video.py``); SkipSample if unreadable."""
    try:
        return read_frames(path, num_frames)
    except VideoError as err:
        raise SkipSample(f"video {path} is unreadable ({err})") from None


def read_image(path: str | Path) -> Image.Image:
    """An image a user named on the command line, as RGB, or a UserError saying why it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass an image file (PNG, JPEG, ...)")
    try:
        return load_image(path)
    except SkipSample:
        raise UserError(
            f"cannot read {path} as an image; pass a PNG, JPEG or other image file"
        ) from None


# ---- dataset and collator -----------------------------------------------------------------


class SupervisedDataset(torch.utils.data.Dataset):
    """Encoded samples, made on the fly (images are loaded in the data loader's workers).

    A sample that fails here (an image that only fails to decode in full, or one too long to
    keep its image tokens) is replaced by the next usable one, so batches keep their size and
    the order stays deterministic. Only the failed sample's own id travels with the batch
    (``skipped``) for the trainer to count: a replacement candidate that fails too is counted
    when it is asked for itself, so every bad sample counts once per pass over the data. After
    ``MAX_REPLACEMENT_TRIES`` failed candidates in a row it gives up with a UserError.
    """

    def __init__(
        self,
        records,
        indices: Sequence[int],
        image_folder: str | Path,
        encoder: SampleEncoder,
        video_frames: int = DEFAULT_VIDEO_FRAMES,
    ) -> None:
        self.records = records
        self.indices = list(indices)
        self.image_folder = Path(image_folder)
        self.encoder = encoder
        self.video_frames = video_frames
        if not self.indices:
            raise UserError(
                f"none of the {len(records)} samples is usable (see the warnings above for why); "
                "fix data.path / data.image_folder"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def sample_name(self, position: int) -> str:
        index = self.indices[position]
        return sample_id(self.records[index], index)

    def encode_index(self, position: int) -> EncodedSample:
        index = self.indices[position]
        record = self.records[index]
        images = [load_image(path) for path in image_paths(record, self.image_folder)]
        videos = [
            load_video(path, self.video_frames) for path in video_paths(record, self.image_folder)
        ]
        return self.encoder.encode(record["conversations"], images, videos)

    def __getitem__(self, position: int) -> dict[str, Any]:
        skipped: list[str] = []
        tries = min(len(self.indices), MAX_REPLACEMENT_TRIES + 1)
        for attempt in range(tries):
            current = (position + attempt) % len(self.indices)
            try:
                sample = self.encode_index(current)
            except SkipSample as reason:
                if attempt == 0:  # the asked-for sample: named and counted
                    logger.warning("skipping sample %s: %s", self.sample_name(current), reason)
                    skipped.append(self.sample_name(current))
                else:  # a replacement candidate: named and counted when it is asked for itself
                    logger.debug(
                        "replacement sample %s fails too: %s", self.sample_name(current), reason
                    )
                continue
            return {
                "input_ids": sample.input_ids,
                "labels": sample.labels,
                "vision_inputs": sample.vision_inputs,
                "skipped": skipped,
            }
        failed = f"sample {self.sample_name(position)}" + (
            f" and the {tries - 1} after it fail" if tries > 1 else " fails"
        )
        raise UserError(
            f"{failed} to encode (see the warnings above); check data.max_length and the images"
        )


class Collator:
    """Right-pads a list of samples into a batch and joins their pixel inputs.

    ``num_skipped`` (samples replaced while loading) rides along for the trainer to count; the
    trainer removes it before the model sees the batch.
    """

    def __init__(self, pad_token_id: int, token_types: dict[int, int] | None = None) -> None:
        self.pad_token_id = pad_token_id
        # token id -> mm_token_type_ids value, for models that place vision tokens by it (Qwen-VL)
        self.token_types = token_types

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(s["input_ids"]) for s in samples)
        batch_size = len(samples)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample["input_ids"])
            input_ids[row, :length] = sample["input_ids"]
            labels[row, :length] = sample["labels"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if self.token_types:
            types = torch.zeros_like(input_ids, dtype=torch.int)
            for token_id, kind in self.token_types.items():
                types[input_ids == token_id] = kind
            batch["mm_token_type_ids"] = types
        batch.update(join_vision_inputs([s.get("vision_inputs") or {} for s in samples]))
        batch["num_skipped"] = torch.tensor(sum(len(s.get("skipped", ())) for s in samples))
        return batch


def join_vision_inputs(per_sample: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The samples' pixel inputs as one batch: each key concatenated over the samples that have it
    (images, their sizes and per-sample counts, videos), anyres crops padded to the most."""
    joined = {}
    for key in sorted({key for inputs in per_sample for key in inputs}):
        tensors = [inputs[key] for inputs in per_sample if key in inputs]
        if (
            key == "pixel_values" and tensors[0].dim() == 5
        ):  # (images, crops, 3, H, W): crops differ
            most = max(t.shape[1] for t in tensors)
            tensors = [
                torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, most - t.shape[1]))
                for t in tensors
            ]
        joined[key] = torch.cat(tensors)
    return joined
