"""Image-question samples for analyses: the first user turn and the image of LLaVA-format samples.

Reading goes through the training data code (``pmod_cli.data.llava_data``): one reader for
LLaVA JSON / JSONL everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.llava_data import (
    PIL_ERRORS,
    SkipSample,
    image_paths,
    load_image,
    load_records,
    sample_id,
)
from ..data.templates import IMAGE_PLACEHOLDER, ConversationError, parse_turns
from ..errors import UserError


@dataclass(frozen=True)
class ImageQuestion:
    sample_id: str
    image: Path
    question: str  # the first user turn, <image> placeholders removed


@dataclass
class QuestionSet:
    questions: list[ImageQuestion]
    skipped: (
        int  # samples passed over: no image, or a conversation or image field that cannot be parsed
    )


def read_image_questions(
    data: str | Path, image_folder: str | Path | None, limit: int
) -> QuestionSet:
    """The first ``limit`` usable samples of a LLaVA JSON / JSONL file, in file order.

    A sample needs a first user turn; a reply is not needed (question-only files do). Samples
    without an image or with a malformed conversation or ``image`` field are skipped (and counted);
    an image that a sample names but that does not exist, or cannot be read, is a UserError, since
    it usually means a wrong ``--image-folder``. ``image_folder`` defaults to the data file's
    directory (the tiny shapes set's: its ``images`` folder).
    """
    from ..data.tiny import default_image_folder

    data = Path(data)
    folder = Path(image_folder) if image_folder is not None else default_image_folder(data)
    if image_folder is not None and not folder.is_dir():
        raise UserError(
            f"image folder {folder} does not exist; pass the directory the data's image paths are relative to"
        )
    if not data.is_file():
        raise UserError(f"data file {data} does not exist; pass --data, a LLaVA JSON or JSONL file")
    records = _quiet_load_records(data)
    questions: list[ImageQuestion] = []
    skipped = 0
    for index, record in enumerate(records):
        if len(questions) == limit:
            break
        try:
            paths = image_paths(record, folder)
            turns = parse_turns(record.get("conversations") or [], require_reply=False)
        except (SkipSample, ConversationError):
            skipped += 1
            continue
        if not paths:
            skipped += 1
            continue
        if not paths[0].is_file():
            raise UserError(
                f"image {paths[0]} of sample {sample_id(record, index)} not found; "
                "pass --image-folder DIR, the directory the data's image paths are relative to"
            )
        try:
            with Image.open(paths[0]) as image:
                image.size  # noqa: B018 - reads the header: fail before the model loads, not midway
        except PIL_ERRORS as err:
            raise UserError(
                f"image {paths[0]} of sample {sample_id(record, index)} is unreadable ({type(err).__name__}); "
                "fix or remove the image"
            ) from None
        question = turns[0].text.replace(IMAGE_PLACEHOLDER, "").strip()
        questions.append(ImageQuestion(sample_id(record, index), paths[0], question))
    if not questions:
        raise UserError(
            f"{data} holds no sample with an image and a question ({skipped} samples skipped)"
        )
    return QuestionSet(questions, skipped)


def _quiet_load_records(data: Path):
    """``load_records`` without datasets' progress bars: stderr stays free for one-line errors."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        return load_records(data)
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def open_image(question: ImageQuestion) -> Image.Image:
    try:
        return load_image(question.image)
    except SkipSample as reason:
        raise UserError(f"sample {question.sample_id}: {reason}; fix or remove the image") from None
