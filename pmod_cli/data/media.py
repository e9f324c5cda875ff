"""The tiny multi-image and video set (``tiny:media/...``): the synthetic shapes, several to a sample.

Written on first use into the pmod cache, seeded, in LLaVA JSON with the images and videos next to
the files (``images/``, ``videos/``, relative paths):

- ``sft_train.json``: a third one image (questions of the shapes set), a third two images
  ("in which image is the red circle?", "what shape is the blue object in the second image?"), a
  third one video of a shape moving across a plain background ("which way does it move?", "what
  colour is the moving shape?"), each with ``<image>`` / ``<video>`` where its media go;
- ``heldout_video.json``: one question per held-out video, with ``answer`` and ``category``
  (the ``pmod_tiny_video`` lmms-eval task scores it by exact match);
- ``heldout_multi.json``: the same for held-out pairs of images.

Videos are MPEG-4 files written with PyAV (``data/video.py``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from .cache import build_once, has_version
from .synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SHORT_ANSWER,
    Scene,
    Shape,
    draw_scene,
    questions,
    random_scene,
)
from .video import write_video

# bump when the generated content changes, so cached copies are rebuilt
MEDIA_VERSION = 1
VIDEO_SIZE = 112  # even: MPEG-4 stores colour at half resolution
VIDEO_FRAMES = 8
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TRAIN_SAMPLES = 400  # per kind: one image, two images, one video
HELDOUT_SAMPLES = 60  # per kind: two images, one video
ORDINALS = ("first", "second")


def moving_shape_frames(
    rng: random.Random, frames: int = VIDEO_FRAMES
) -> tuple[np.ndarray, Shape, str]:
    """(frames, size, size, 3) uint8 of one shape crossing the frame, the shape and its direction."""
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    radius = VIDEO_SIZE * rng.uniform(0.12, 0.16)
    shape = Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), 0.0, 0.0, radius)
    background = rng.choice(BACKGROUNDS)
    across = rng.uniform(radius, VIDEO_SIZE - radius)  # the fixed coordinate
    start, end = radius, VIDEO_SIZE - radius
    arrays = []
    for index in range(frames):
        along = start + (end - start) * index / (frames - 1)
        along = along if dx + dy > 0 else VIDEO_SIZE - along
        x, y = (along, across) if dx else (across, along)
        moved = Shape(shape.kind, shape.colour, x, y, radius)
        arrays.append(np.asarray(draw_scene(Scene(VIDEO_SIZE, VIDEO_SIZE, background, (moved,)))))
    return np.stack(arrays), shape, direction


def video_questions(shape: Shape, direction: str) -> list[tuple[str, str, str]]:
    return [
        ("direction", f"Which way does the {shape.colour} {shape.kind} move?", direction),
        ("colour", "What colour is the moving shape?", shape.colour),
        ("shape", f"What shape is the {shape.colour} object?", shape.kind),
    ]


def pair_questions(scenes: tuple[Scene, Scene], rng: random.Random) -> list[tuple[str, str, str]]:
    """Questions about two images that only both images together answer."""
    pairs = []
    colours = [{s.colour for s in scene.shapes} for scene in scenes]
    for index, scene in enumerate(scenes):
        for shape in scene.shapes:
            if shape.colour not in colours[1 - index]:
                pairs.append(
                    (
                        "which",
                        f"In which image is the {shape.colour} {shape.kind}, the first or the second?",
                        ORDINALS[index],
                    )
                )
            pairs.append(
                (
                    "shape",
                    f"What shape is the {shape.colour} object in the {ORDINALS[index]} image?",
                    shape.kind,
                )
            )
    total = sum(len(scene.shapes) for scene in scenes)
    pairs.append(("count", "How many shapes are there in the two images together?", str(total)))
    return pairs


def _turn(question: str, placeholders: str) -> list[dict]:
    return [{"from": "human", "value": f"{placeholders}{question}\n{SHORT_ANSWER}"}]


def _conversation(placeholders: str, chosen: list[tuple[str, str, str]]) -> list[dict]:
    turns = []
    for index, (_, question, answer) in enumerate(chosen):
        turns += _turn(question, placeholders if index == 0 else "")
        turns.append({"from": "gpt", "value": answer})
    return turns


def _save_image(root: Path, scene: Scene, name: str) -> str:
    draw_scene(scene).save(root / "images" / name)
    return f"images/{name}"


def _video_sample(
    root: Path, rng: random.Random, name: str
) -> tuple[str, list[tuple[str, str, str]]]:
    frames, shape, direction = moving_shape_frames(rng)
    write_video(root / "videos" / name, frames)
    return f"videos/{name}", video_questions(shape, direction)


def _pair_sample(
    root: Path, rng: random.Random, stem: str
) -> tuple[list[str], list[tuple[str, str, str]]]:
    scenes = (random_scene(rng), random_scene(rng))
    paths = [_save_image(root, scene, f"{stem}_{k}.png") for k, scene in enumerate(scenes)]
    return paths, pair_questions(scenes, rng)


def _train_records(root: Path, rng: random.Random, count: int) -> list[dict]:
    records = []
    for index in range(count):
        scene = random_scene(rng)
        path = _save_image(root, scene, f"train_single_{index:05d}.png")
        asked = questions(scene, rng)
        chosen = rng.sample(asked, min(2, len(asked)))
        records.append(
            {
                "id": f"single_{index:05d}",
                "image": path,
                "conversations": _conversation("<image>\n", chosen),
            }
        )
        paths, pairs = _pair_sample(root, rng, f"train_pair_{index:05d}")
        chosen = rng.sample(pairs, min(2, len(pairs)))
        records.append(
            {
                "id": f"pair_{index:05d}",
                "image": paths,
                "conversations": _conversation("<image>\n<image>\n", chosen),
            }
        )
        video, asked = _video_sample(root, rng, f"train_{index:05d}.mp4")
        chosen = rng.sample(asked, 2)
        records.append(
            {
                "id": f"video_{index:05d}",
                "video": video,
                "conversations": _conversation("<video>\n", chosen),
            }
        )
    return records


def _heldout(
    media: str | list[str], placeholders: str, sample_id: str, asked: tuple[str, str, str], key: str
) -> dict:
    category, question, answer = asked
    return {
        "id": sample_id,
        key: media,
        "category": category,
        "answer": answer,
        "conversations": [*_turn(question, placeholders), {"from": "gpt", "value": answer}],
    }


def generate(
    root: str | Path, train_samples: int = TRAIN_SAMPLES, heldout_samples: int = HELDOUT_SAMPLES
) -> Path:
    """Write the set under ``root`` (images/, videos/, sft_train.json, heldout_video.json, heldout_multi.json)."""
    root = Path(root)
    for folder in ("images", "videos"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    train = _train_records(root, rng, train_samples)
    held_rng = random.Random(12)
    videos, pairs = [], []
    for index in range(heldout_samples):
        video, asked = _video_sample(root, held_rng, f"heldout_{index:05d}.mp4")
        videos.append(
            _heldout(video, "<video>\n", f"video_{index:05d}", held_rng.choice(asked), "video")
        )
        paths, asked = _pair_sample(root, held_rng, f"heldout_pair_{index:05d}")
        pairs.append(
            _heldout(
                paths, "<image>\n<image>\n", f"pair_{index:05d}", held_rng.choice(asked), "image"
            )
        )
    for name, records in (
        ("sft_train.json", train),
        ("heldout_video.json", videos),
        ("heldout_multi.json", pairs),
    ):
        (root / name).write_text(json.dumps(records, indent=1))
    (root / "VERSION").write_text(str(MEDIA_VERSION))
    return root


def ensure_media(root: str | Path) -> Path:
    """The media set at ``root``, generated there on first use (atomically, safe across ranks)."""
    return build_once(Path(root), is_complete=_is_current, build=generate)


def _is_current(root: Path) -> bool:
    return has_version(root, MEDIA_VERSION)
