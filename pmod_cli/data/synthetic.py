"""The synthetic visual QA set of the tiny default: coloured shapes on plain backgrounds.

Every image is a scene of 1-4 shapes (fewer more often; circle, square, triangle, diamond) in
distinct colours on a plain background, drawn at one of several aspect ratios. From a scene we
write:

- ``captions.json``: one caption per training image, for the pretrain stage (``plain`` template);
- ``sft_train.json``: multi-turn conversations asking about colour, shape, count and position;
- ``heldout.json``: one question per held-out image, answered by one word or number, with the
  answer also in ``answer`` and the question kind in ``category`` so evaluation can score it by
  exact match.

All three are LLaVA JSON (``id``, ``image``, ``conversations`` of ``from``/``value`` with
``<image>``). Generation is seeded, so the same version always writes the same files.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .cache import build_once, has_version

# bump when the generated content changes, so cached copies are rebuilt
SYNTHETIC_VERSION = 2

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = [(245, 245, 245), (200, 200, 200), (40, 40, 40), (235, 225, 200)]
SHAPES = ("circle", "square", "triangle", "diamond")
# (width, height): square, landscape and portrait images
CANVAS_SIZES = [(112, 112), (168, 112), (112, 168), (224, 112), (112, 224)]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# scenes with fewer shapes are more frequent: a tiny model learns to read one shape quickly,
# binding colour to shape among four takes far longer than the tiny default's budget
SHAPE_COUNT_WEIGHTS = {1: 0.4, 2: 0.3, 3: 0.2, 4: 0.1}
SHORT_ANSWER = "Answer the question using a single word or number."

TRAIN_IMAGES = 2000
HELDOUT_IMAGES = 300


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    centre_x: float  # in pixels
    centre_y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]


def random_scene(rng: random.Random) -> Scene:
    width, height = rng.choice(CANVAS_SIZES)
    count = rng.choices(list(SHAPE_COUNT_WEIGHTS), weights=list(SHAPE_COUNT_WEIGHTS.values()))[0]
    colours = rng.sample(list(COLOURS), count)  # distinct colours: "the red object" is unambiguous
    radius = min(width, height) * rng.uniform(0.14, 0.2)
    shapes: list[Shape] = []
    for colour in colours:
        for _ in range(100):  # rejection-sample a spot that does not overlap the others
            x = rng.uniform(radius, width - radius)
            y = rng.uniform(radius, height - radius)
            if all(math.hypot(x - s.centre_x, y - s.centre_y) > 2.2 * radius for s in shapes):
                break
        else:
            break
        shapes.append(Shape(rng.choice(SHAPES), colour, x, y, radius))
    return Scene(width, height, rng.choice(BACKGROUNDS), tuple(shapes))


def draw_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x, y, r, fill = shape.centre_x, shape.centre_y, shape.radius, COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif shape.kind == "square":
            side = r * 0.85
            draw.rectangle([x - side, y - side, x + side, y + side], fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return image


def _side(scene: Scene, shape: Shape) -> str | None:
    """'left'/'right' (wide or square images) or 'top'/'bottom' (tall ones); None near the middle."""
    if scene.height > scene.width:
        offset, low, high = shape.centre_y - scene.height / 2, "top", "bottom"
        extent = scene.height
    else:
        offset, low, high = shape.centre_x - scene.width / 2, "left", "right"
        extent = scene.width
    if abs(offset) < 0.08 * extent:
        return None
    return low if offset < 0 else high


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(category, question, answer) pairs that the scene answers without ambiguity."""
    pairs: list[tuple[str, str, str]] = []
    by_kind: dict[str, list[Shape]] = {}
    for shape in scene.shapes:
        by_kind.setdefault(shape.kind, []).append(shape)
    for shape in scene.shapes:
        if len(by_kind[shape.kind]) == 1:
            pairs.append(("colour", f"What colour is the {shape.kind}?", shape.colour))
        pairs.append(("shape", f"What shape is the {shape.colour} object?", shape.kind))
        side = _side(scene, shape)
        if side is not None:
            options = (
                "left or on the right" if side in ("left", "right") else "top or at the bottom"
            )
            preposition = "on the" if side in ("left", "right") else "at the"
            pairs.append(
                ("position", f"Is the {shape.colour} {shape.kind} {preposition} {options}?", side)
            )
    pairs.append(("count", "How many shapes are there?", str(len(scene.shapes))))
    kind = rng.choice(SHAPES)
    pairs.append(("count", f"How many {kind}s are there?", str(len(by_kind.get(kind, [])))))
    return pairs


def caption(scene: Scene) -> str:
    parts = [f"a {s.colour} {s.kind}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    background = {0: "white", 1: "grey", 2: "black", 3: "beige"}[
        BACKGROUNDS.index(scene.background)
    ]
    noun = "shape" if len(parts) == 1 else "shapes"
    return f"{NUMBER_WORDS[len(parts)].capitalize()} {noun} on a {background} background: {listed}."


def corpus(limit: int = 400) -> list[str]:
    """Text in the style of the synthetic set, for training the tiny tokenizer."""
    rng = random.Random(12345)
    texts = []
    for _ in range(limit):
        scene = random_scene(rng)
        texts.append(caption(scene))
        texts.extend(f"{q} {SHORT_ANSWER} {a}" for _, q, a in questions(scene, rng))
    return texts


def _write_split(root: Path, split: str, num_images: int, seed: int) -> list[tuple[Scene, str]]:
    rng = random.Random(seed)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    scenes = []
    for index in range(num_images):
        scene = random_scene(rng)
        name = f"{split}/{split}_{index:05d}.png"
        draw_scene(scene).save(root / "images" / name)
        scenes.append((scene, name))
    return scenes


def _dump(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records, indent=1))


def generate(
    root: str | Path, train_images: int = TRAIN_IMAGES, heldout_images: int = HELDOUT_IMAGES
) -> Path:
    """Write the synthetic set under ``root`` (images/, captions.json, sft_train.json, heldout.json)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    captions, conversations, heldout = [], [], []
    qa_rng = random.Random(7)
    for scene, name in _write_split(root, "train", train_images, seed=1):
        sample_id = Path(name).stem
        captions.append(
            {
                "id": sample_id,
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image briefly."},
                    {"from": "gpt", "value": caption(scene)},
                ],
            }
        )
        pairs = questions(scene, qa_rng)
        chosen = qa_rng.sample(pairs, min(3, len(pairs)))
        turns = []
        for turn, (_, question, answer) in enumerate(chosen):
            prefix = "<image>\n" if turn == 0 else ""
            turns.append({"from": "human", "value": f"{prefix}{question}\n{SHORT_ANSWER}"})
            turns.append({"from": "gpt", "value": answer})
        conversations.append({"id": sample_id, "image": name, "conversations": turns})
    for scene, name in _write_split(root, "heldout", heldout_images, seed=2):
        category, question, answer = qa_rng.choice(questions(scene, qa_rng))
        heldout.append(
            {
                "id": Path(name).stem,
                "image": name,
                "category": category,
                "answer": answer,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}\n{SHORT_ANSWER}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    _dump(root / "captions.json", captions)
    _dump(root / "sft_train.json", conversations)
    _dump(root / "heldout.json", heldout)
    (root / "VERSION").write_text(str(SYNTHETIC_VERSION))
    return root


def ensure_synthetic(root: str | Path) -> Path:
    """The synthetic set at ``root``, generated there on first use (atomically, safe across ranks)."""
    return build_once(Path(root), is_complete=_is_current, build=generate)


def _is_current(root: Path) -> bool:
    return has_version(root, SYNTHETIC_VERSION)
