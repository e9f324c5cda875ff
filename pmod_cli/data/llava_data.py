"""LLaVA-format training data: read, check, encode, collate.

    records = load_records("llava_v1_5_mix665k.json")            # JSON or JSONL, via `datasets`
    scan = scan_records(records, image_folder, max_bad_fraction)  # drops bad samples, with warnings
    dataset = SupervisedDataset(records, scan.valid, image_folder, SampleEncoder(processor, template, 2048))
    batch = Collator(pad_token_id)([dataset[0], dataset[1]])

A sample is ``{"id", "image" (a path, a list of paths, or absent for text-only), "conversations":
[{"from": "human"|"gpt", "value": ...}]}`` with ``<image>`` where each image goes. Encoding
formats the conversation with a template (labels -100 except on assistant replies), expands
each ``<image>`` into the number of image tokens the HF processor gives for that image (so
LLaVA-NeXT's anyres count depends on the image size), and truncates text at ``max_length``
without ever cutting into image tokens (such a sample is skipped).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from .templates import IMAGE_PLACEHOLDER, ConversationError, ConversationTemplate, Turn, parse_turns

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# samples named one by one in warnings; the rest are counted
MAX_NAMED_WARNINGS = 50


class SkipSample(Exception):
    """This sample cannot be used; the message says why."""


# ---- reading ------------------------------------------------------------------------------


def load_records(path: str | Path):
    """A LLaVA JSON (a list of samples) or JSONL file as a ``datasets.Dataset``."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; set data.path to a LLaVA JSON or JSONL file")
    try:
        records = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception:  # noqa: BLE001 - mixed-type fields (LLaVA-665K's ids) defeat arrow's schema
        records = datasets.Dataset.from_list(_read_json_normalised(path))
    if "conversations" not in records.column_names:
        raise UserError(f"{path} has no 'conversations' field; expected LLaVA JSON samples")
    return records


def _read_json_normalised(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
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
        # one schema for arrow: ids as strings, images as lists of strings
        images = item.get("image")
        records.append(
            {
                "id": str(item.get("id", index)),
                "image": [images] if isinstance(images, str) else images,
                "conversations": item.get("conversations"),
            }
        )
    return records


def sample_id(record: dict[str, Any], index: int) -> str:
    value = record.get("id")
    return str(value) if value is not None else f"#{index}"


def image_paths(record: dict[str, Any], image_folder: Path) -> list[Path]:
    images = record.get("image")
    if images is None or images == "" or images == []:
        return []
    if isinstance(images, str):
        images = [images]
    return [Path(p) if Path(p).is_absolute() else image_folder / p for p in images]


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
    paths = image_paths(record, image_folder)
    placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders > len(paths):
        raise SkipSample(f"{placeholders} <image> placeholders but {len(paths)} images")
    for path in paths:
        if not path.is_file():
            raise SkipSample(f"image {path} not found")
        if open_images:
            try:
                with Image.open(path) as image:
                    image.size  # noqa: B018 - reads the header
            except (UnidentifiedImageError, OSError) as err:
                raise SkipSample(f"image {path} is unreadable ({err.__class__.__name__})") from None


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

        iterator = track(iterator, total=len(records), description="checking samples", transient=True)
    for index, record in iterator:
        try:
            check_record(record, image_folder, open_images)
        except SkipSample as reason:
            result.bad.append((sample_id(record, index), str(reason)))
            if len(result.bad) <= MAX_NAMED_WARNINGS:
                logger.warning("skipping sample %s: %s", sample_id(record, index), reason)
            continue
        result.valid.append(index)
        result.text_only += not image_paths(record, image_folder)
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


# ---- encoding -----------------------------------------------------------------------------


@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # (seq,) long
    labels: torch.Tensor  # (seq,) long, IGNORE_INDEX outside assistant replies
    pixel_values: torch.Tensor | None  # (images, 3, H, W) or LLaVA-NeXT (images, crops, 3, H, W)
    image_sizes: torch.Tensor | None  # (images, 2), LLaVA-NeXT only
    truncated: bool = False


class SampleEncoder:
    """Formats, tokenizes and masks one sample for a given processor and template."""

    def __init__(self, processor, template: ConversationTemplate, max_length: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.max_length = max_length
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        # what the tokenizer puts before any text (Llama: <s>, Qwen2: nothing)
        self.prefix_ids = self.tokenizer("", add_special_tokens=True)["input_ids"]
        self.eos_token = self.tokenizer.eos_token or ""

    def _images(self, images: Sequence[Image.Image]) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """Per image: the number of image tokens; and the stacked pixel values (and image sizes)."""
        counts, pixels, sizes = [], [], []
        for image in images:
            # the processor decides how many tokens an image becomes (anyres: depends on its size)
            out = self.processor(text=self.processor.image_token, images=[image], return_tensors="pt")
            counts.append(int((out["input_ids"] == self.image_token_id).sum()))
            pixels.append(out["pixel_values"])
            if "image_sizes" in out:
                sizes.append(out["image_sizes"])
        if not images:
            return counts, None, None
        if pixels[0].dim() == 5:  # LLaVA-NeXT: (1, crops, 3, H, W); crops differ between images
            most = max(p.shape[1] for p in pixels)
            pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
        return counts, torch.cat(pixels), torch.cat(sizes) if sizes else None

    def encode(self, conversations: list[dict], images: Sequence[Image.Image] = ()) -> EncodedSample:
        try:
            turns = parse_turns(conversations)
        except ConversationError as err:
            raise SkipSample(str(err)) from None
        placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
        if placeholders < len(images):
            # LLaVA data sometimes leaves the placeholder out; the image then leads the first turn
            missing = IMAGE_PLACEHOLDER * (len(images) - placeholders)
            turns[0] = Turn(turns[0].role, f"{missing}\n{turns[0].text}")
        elif placeholders > len(images):
            raise SkipSample(f"{placeholders} <image> placeholders but {len(images)} images")
        counts, pixel_values, image_sizes = self._images(images)

        ids: list[int] = list(self.prefix_ids)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        image_end = 0  # index just past the last image token
        image_index = 0
        for piece in self.template.format(turns, self.eos_token):
            for part_index, part in enumerate(piece.text.split(IMAGE_PLACEHOLDER)):
                if part_index > 0:  # an <image> stood before this part
                    ids.extend([self.image_token_id] * counts[image_index])
                    labels.extend([IGNORE_INDEX] * counts[image_index])
                    image_index += 1
                    image_end = len(ids)
                if part:
                    part_ids = self.tokenizer(part, add_special_tokens=False)["input_ids"]
                    ids.extend(part_ids)
                    labels.extend(part_ids if piece.is_target else [IGNORE_INDEX] * len(part_ids))

        truncated = len(ids) > self.max_length
        if truncated:
            if image_end > self.max_length:
                raise SkipSample(
                    f"its image tokens end at {image_end}, past data.max_length {self.max_length}"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample("no assistant reply left to train on (empty, or cut by data.max_length)")
        return EncodedSample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            truncated=truncated,
        )


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise SkipSample(f"image {path} is unreadable ({err.__class__.__name__}: {err})") from None


# ---- dataset and collator -----------------------------------------------------------------


class SupervisedDataset(torch.utils.data.Dataset):
    """Encoded samples, made on the fly (images are loaded in the data loader's workers).

    A sample that fails here (an image that only fails to decode in full, or one too long to
    keep its image tokens) is replaced by the next usable one, so batches keep their size and
    the order stays deterministic; the replaced sample's id travels with the batch
    (``skipped``) so the trainer can count it.
    """

    def __init__(self, records, indices: Sequence[int], image_folder: str | Path, encoder: SampleEncoder) -> None:
        self.records = records
        self.indices = list(indices)
        self.image_folder = Path(image_folder)
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.indices)

    def encode_index(self, position: int) -> EncodedSample:
        index = self.indices[position]
        record = self.records[index]
        images = [load_image(path) for path in image_paths(record, self.image_folder)]
        return self.encoder.encode(record["conversations"], images)

    def __getitem__(self, position: int) -> dict[str, Any]:
        skipped: list[str] = []
        for attempt in range(len(self.indices)):
            current = (position + attempt) % len(self.indices)
            try:
                sample = self.encode_index(current)
            except SkipSample as reason:
                name = sample_id(self.records[self.indices[current]], self.indices[current])
                logger.warning("skipping sample %s: %s", name, reason)
                skipped.append(name)
                continue
            return {
                "input_ids": sample.input_ids,
                "labels": sample.labels,
                "pixel_values": sample.pixel_values,
                "image_sizes": sample.image_sizes,
                "skipped": skipped,
            }
        raise UserError("no sample of the data set can be encoded; check data.max_length and the images")


class Collator:
    """Right-pads a list of samples into a batch and stacks their images.

    ``num_skipped`` (samples replaced while loading) rides along for the trainer to count; the
    trainer removes it before the model sees the batch.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

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
        pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if pixels:
            if pixels[0].dim() == 5:  # LLaVA-NeXT: pad the crop dimension to the batch's largest
                most = max(p.shape[1] for p in pixels)
                pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
            batch["pixel_values"] = torch.cat(pixels)
            sizes = [s["image_sizes"] for s in samples if s.get("image_sizes") is not None]
            if sizes:
                batch["image_sizes"] = torch.cat(sizes)
        batch["num_skipped"] = torch.tensor(sum(len(s.get("skipped", ())) for s in samples))
        return batch
