"""Image-question samples: the first user turn and the images (and videos) of LLaVA-format
samples, for the commands that run a model on a data file's questions (``pmod arank``, flops
calibration).

Reading goes through the training data code (``llava_data``): one reader for LLaVA JSON / JSONL
everywhere. A sample is prompted as evaluation would (``prompt_inputs``): its question after all
of its images, then its videos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import UserError
from .llava_data import (
    DEFAULT_VIDEO_FRAMES,
    PIL_ERRORS,
    SkipSample,
    image_paths,
    load_image,
    load_records,
    load_video,
    sample_id,
    video_paths,
)
from .prompts import build_prompt, encode
from .templates import MEDIA_PLACEHOLDERS, ConversationError, parse_turns
from .tiny import default_image_folder
from .video import VideoError, check_video


@dataclass(frozen=True)
class ImageQuestion:
    sample_id: str
    image: Path  # the first image (the first video when the sample has none)
    question: str  # the first user turn, <image> / <video> placeholders removed
    images: tuple[Path, ...] = ()  # every image of the sample
    videos: tuple[Path, ...] = ()  # every video of the sample


@dataclass
class QuestionSet:
    questions: list[ImageQuestion]
    skipped: (
        int  # samples passed over: no image, or a conversation or image field that cannot be parsed
    )


def read_image_questions(
    data: str | Path, image_folder: str | Path | None, limit: int, videos: bool = False
) -> QuestionSet:
    """The first ``limit`` usable samples of a LLaVA JSON / JSONL file, in file order.

    A sample needs a first user turn; a reply is not needed (question-only files do). Samples
    without an image (or, with ``videos``, a video) or with a malformed conversation, ``image`` or
    ``video`` field are skipped (and counted), and so are samples with a video when ``videos`` is
    false (a model that takes none); an image or video that a sample names but that does not
    exist, or cannot be read, is a UserError, since it usually means a wrong ``--image-folder``.
    ``image_folder`` defaults to the data file's directory (the tiny shapes set's: its ``images`` folder).
    """
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
            images, clips = image_paths(record, folder), video_paths(record, folder)
            turns = parse_turns(record.get("conversations") or [], require_reply=False)
        except (SkipSample, ConversationError):
            skipped += 1
            continue
        if not (images or clips) or (clips and not videos):
            skipped += 1
            continue
        name = sample_id(record, index)
        for path in images:
            _check_image(path, name)
        for path in clips:
            _check_video(path, name)
        question = turns[0].text
        for placeholder in MEDIA_PLACEHOLDERS:
            question = question.replace(placeholder, "")
        first = (images or clips)[0]
        questions.append(ImageQuestion(name, first, question.strip(), tuple(images), tuple(clips)))
    if not questions:
        kind = "an image or video" if videos else "an image"
        raise UserError(
            f"{data} holds no sample with {kind} and a question ({skipped} samples skipped)"
        )
    return QuestionSet(questions, skipped)


def _check_image(path: Path, name: str) -> None:
    """Fail before the model loads, not midway."""
    if not path.is_file():
        raise UserError(
            f"image {path} of sample {name} not found; pass --image-folder DIR, the directory the data's image paths are relative to"
        )
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - reads the header
    except PIL_ERRORS as err:
        raise UserError(
            f"image {path} of sample {name} is unreadable ({type(err).__name__}); fix or remove the image"
        ) from None


def _check_video(path: Path, name: str) -> None:
    if not path.is_file():
        raise UserError(
            f"video {path} of sample {name} not found; pass --image-folder DIR, the directory the data's video paths are relative to"
        )
    try:
        check_video(path)
    except VideoError as err:
        raise UserError(
            f"video {path} of sample {name} is unreadable ({err}); fix or remove the video"
        ) from None


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


def open_image(question: ImageQuestion):
    """The sample's first image."""
    try:
        return load_image(question.image)
    except SkipSample as reason:
        raise UserError(f"sample {question.sample_id}: {reason}; fix or remove the image") from None


def open_media(
    question: ImageQuestion, num_frames: int = DEFAULT_VIDEO_FRAMES
) -> tuple[list, list]:
    """The sample's images and its videos' ``num_frames`` frames each."""
    try:
        paths = question.images or (() if question.videos else (question.image,))
        images = [load_image(path) for path in paths]
        clips = [load_video(path, num_frames) for path in question.videos]
    except SkipSample as reason:
        raise UserError(f"sample {question.sample_id}: {reason}; fix or remove it") from None
    return images, clips


def prompt_inputs(processor, model, questions: list[ImageQuestion], template: str) -> dict:
    """One processor batch of ``questions``, each prompted as evaluation would: the checkpoint's
    chat template (else ``template``), the question after the sample's images and videos."""
    video_processor = getattr(processor, "video_processor", None)
    num_frames = getattr(video_processor, "num_frames", None) or DEFAULT_VIDEO_FRAMES
    prompts, images, videos = [], [], []
    for question in questions:
        sample_images, sample_videos = open_media(question, num_frames)
        prompts.append(
            build_prompt(
                processor,
                question.question,
                len(sample_images),
                template,
                num_videos=len(sample_videos),
            )
        )
        images.append(sample_images)
        videos += sample_videos
    return encode(processor, prompts, images, model, videos=videos)
