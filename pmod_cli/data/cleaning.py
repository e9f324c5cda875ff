"""The checks `pmod data prepare` runs on each sample, and the reasons it drops one.

    problem = conversation_problem(sample["conversations"], image_count=1)  # None or SampleProblem
    extension = check_image_bytes(data)                                   # "jpg"; raises SampleProblem

The checks agree with the training reader (``llava_data.check_record``): a sample kept here is
one that ``scan_records`` keeps. They are stricter in one place: a sample with fewer ``<image>``
placeholders than images is dropped (the reader would insert the missing ones in front of the
first turn, which the original data never meant).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from .llava_data import PIL_ERRORS
from .templates import IMAGE_PLACEHOLDER, ROLE_ALIASES, ConversationError, parse_turns

# reason key -> what it means, in the order reports list them
REASONS = {
    "malformed": "not a sample with a 'conversations' list of {from, value} entries",
    "non_string_value": "a conversation value that is not a string",
    "wrong_roles": "a speaker other than human/gpt, or turns that do not alternate",
    "no_reply": "no user turn followed by an assistant reply",
    "image_count_mismatch": "the <image> placeholders do not match the images",
    "bad_image_field": "an 'image' field that is neither a path nor a list of paths",
    "missing_image": "an image file that does not exist (or a row without image bytes)",
    "unreadable_image": "an image that does not decode",
}

# PIL's format name -> the file extension an image is written with
EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
}


class SampleProblem(Exception):
    """Why a sample is dropped: one of ``REASONS`` and the detail for this sample."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail


def conversation_problem(conversations: Any, image_count: int) -> SampleProblem | None:
    """The first thing wrong with a sample's conversation given its number of images, or None."""
    if not isinstance(conversations, list) or not conversations:
        return SampleProblem("malformed", "no 'conversations' list")
    for message in conversations:
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            return SampleProblem("malformed", "a conversation entry without 'from' and 'value'")
        if not isinstance(message["value"], str):
            kind = type(message["value"]).__name__
            return SampleProblem(
                "non_string_value", f"a conversation value of type {kind}, not a string"
            )
        if ROLE_ALIASES.get(str(message["from"]).lower()) is None:
            return SampleProblem(
                "wrong_roles", f"unknown speaker {message['from']!r} (expected human/gpt)"
            )
    try:
        turns = parse_turns(conversations)
    except ConversationError as err:
        # what is left after the checks above: roles out of order, or nothing to train on
        return SampleProblem("no_reply" if _has_no_pair(conversations) else "wrong_roles", str(err))
    placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != image_count:
        return SampleProblem(
            "image_count_mismatch", f"{placeholders} <image> placeholders but {image_count} images"
        )
    return None


def _has_no_pair(conversations: list[dict]) -> bool:
    roles = [ROLE_ALIASES[str(message["from"]).lower()] for message in conversations]
    roles = [role for role in roles if role != "system"]
    return not any(first == "user" and second == "assistant" for first, second in pairwise(roles))


@contextmanager
def strict_image_decoding() -> Iterator[None]:
    """A truncated image is unreadable here, whatever another library (lmms-eval does, on
    import) has set PIL to do; set once around a whole pass, as the worker threads share it."""
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def check_image_bytes(data: bytes) -> str:
    """Decode the image in ``data``; its file extension, or SampleProblem if it does not decode."""
    return _decode(io.BytesIO(data), "the image bytes")


def check_image_file(path: Path) -> None:
    """SampleProblem if ``path`` is not a file or does not decode."""
    if not path.is_file():
        raise SampleProblem("missing_image", f"image {path} not found")
    _decode(path, f"image {path}")


def _decode(source, name: str) -> str:
    try:
        with Image.open(source) as image:
            # JPEG decodes at 1/8 scale: every byte is still read (a truncated file still
            # fails), at a fraction of the cost
            image.draft(image.mode, (1, 1))
            image.load()
            return EXTENSIONS.get(image.format or "", (image.format or "img").lower())
    except PIL_ERRORS as err:
        raise SampleProblem(
            "unreadable_image", f"{name}: cannot be decoded ({err.__class__.__name__})"
        ) from None
