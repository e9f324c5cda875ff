"""The grid set: small marks on a 16 x 16 grid, for comparing token-reduction methods on a CPU.

Built so that the prompt has the shape of LLaVA-1.5's (576 vision tokens against 58 text tokens):
a 224 px image is 16 x 16 = 256 patches of 14 px, each a vision token, and a question with its
ChatML prompt is at most 40 text tokens. A scene holds 3-6 marks, each a block of 3 x 3 cells of
the patch grid at any position (apart from the others): one of six colours and one of four kinds
(square, ring, cross, dot, drawn in each of its cells), on a light background whose cells differ a
little in shade. The marks cover 27-54 of the 256 tokens, the rest is background, so a method that
drops tokens must keep the ones that matter.

Questions (one word answers, each needs the image; the text alone gives no more than the prior
of its kind):

- ``colour``: "What colour is the ring?" (the image has exactly one ring): 6 answers;
- ``kind``: "What shape is the red mark?" (exactly one red mark): 4 answers;
- ``count``: "How many marks are there?": 3-6, equally often;
- ``exists``: "Is there a blue mark?": yes / no, about equally often.

Files (LLaVA JSON, written by ``generate``): ``captions.json`` (pretrain: every mark in reading
order), ``sft_train.json`` (four questions per image, one of each kind in a random order, as one
conversation), ``heldout.json``
(one question per held-out image, with ``answer`` and ``category``). Seeded: the same version
always writes the same files.

``grid_base(path)`` writes the model the study starts from: a fixed patch encoder (a one-layer
CLIP vision model whose patch embedding reports each patch's mean colour over a 3 x 3 grid of
sub-blocks, so a vision token says what its cell holds without any training), a random 6-layer
Llama and a tokenizer trained on the set's text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .cache import build_once, has_version
from .tiny_build import save_llava_with_parts, tiny_llava

# bump when the generated content changes, so cached copies are rebuilt
GRID_VERSION = 7
# bump when the base model changes (its tokenizer learns the set's text, so a new set is a new base)
BASE_VERSION = f"{GRID_VERSION}.1"
LLM_LAYERS, LLM_HIDDEN = 6, 64

IMAGE_SIZE = 224
CELL = 14  # one patch of the vision tower
GRID = IMAGE_SIZE // CELL  # 16 cells a side: 256 vision tokens
MARK_CELLS = 3  # a mark is MARK_CELLS x MARK_CELLS cells
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
KINDS = ("square", "ring", "cross", "dot")
BACKGROUNDS = [(215, 215, 215)]
MARKS_PER_IMAGE = (3, 6)
CATEGORIES = ("colour", "kind", "count", "exists")

TRAIN_IMAGES = 12000
HELDOUT_IMAGES = 2400
QUESTIONS_PER_TRAIN_IMAGE = 4


@dataclass(frozen=True)
class Mark:
    kind: str
    colour: str
    row: int  # its top-left cell
    col: int


@dataclass(frozen=True)
class GridScene:
    background: tuple[int, int, int]
    marks: tuple[Mark, ...]
    tint_seed: int


def random_scene(rng: random.Random) -> GridScene:
    count = rng.randint(*MARKS_PER_IMAGE)
    corners: list[tuple[int, int]] = []
    while len(corners) < count:  # a free cell between any two marks: they never touch
        row, col = rng.randrange(GRID - MARK_CELLS + 1), rng.randrange(GRID - MARK_CELLS + 1)
        if all(max(abs(row - r), abs(col - c)) > MARK_CELLS for r, c in corners):
            corners.append((row, col))
    colours = list(COLOURS)
    marks = tuple(
        Mark(rng.choice(KINDS), rng.choice(colours), row, col) for row, col in sorted(corners)
    )
    return GridScene(rng.choice(BACKGROUNDS), marks, rng.randrange(2**31))


def draw_scene(scene: GridScene) -> Image.Image:
    # a tinted background: every cell a slightly different shade, so no background token is a
    # copy of another (and the PNG stays small)
    shades = np.random.default_rng(scene.tint_seed).integers(-16, 17, size=(GRID, GRID, 1))
    tint = np.repeat(np.repeat(shades, CELL, axis=0), CELL, axis=1)  # (224, 224, 1)
    pixels = np.clip(np.asarray(scene.background)[None, None, :] + tint, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for mark in scene.marks:
        for row in range(mark.row, mark.row + MARK_CELLS):
            for col in range(mark.col, mark.col + MARK_CELLS):
                _draw_cell(draw, mark.kind, col * CELL, row * CELL, COLOURS[mark.colour])
    return image


def _draw_cell(
    draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, fill: tuple[int, int, int]
) -> None:
    """One cell of a mark: its kind's pattern inside the 14 px patch at (x, y)."""
    if kind == "square":
        draw.rectangle([x + 1, y + 1, x + 12, y + 12], fill=fill)
    elif kind == "ring":
        draw.rectangle([x + 1, y + 1, x + 12, y + 12], outline=fill, width=3)
    elif kind == "cross":
        draw.rectangle([x + 5, y + 1, x + 8, y + 12], fill=fill)
        draw.rectangle([x + 1, y + 5, x + 12, y + 8], fill=fill)
    else:  # dot
        draw.rectangle([x + 4, y + 4, x + 9, y + 9], fill=fill)


def caption(scene: GridScene) -> str:
    """Every mark in reading order (row by row): 'red ring, blue dot and green cross.'"""
    names = [f"{mark.colour} {mark.kind}" for mark in scene.marks]
    return ", ".join(names[:-1]) + f" and {names[-1]}."


def question(scene: GridScene, category: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of ``category`` about the scene, or None if the scene has none."""
    kinds = [mark.kind for mark in scene.marks]
    colours = [mark.colour for mark in scene.marks]
    if category == "colour":
        unique = [kind for kind in KINDS if kinds.count(kind) == 1]
        if not unique:
            return None
        kind = rng.choice(unique)
        return f"What colour is the {kind}?", colours[kinds.index(kind)]
    if category == "kind":
        unique = [colour for colour in COLOURS if colours.count(colour) == 1]
        if not unique:
            return None
        colour = rng.choice(unique)
        return f"What shape is the {colour} mark?", kinds[colours.index(colour)]
    if category == "count":  # the same text for every image: only the image tells
        return "How many marks are there?", str(len(scene.marks))
    present = sorted({mark.colour for mark in scene.marks})
    absent = [colour for colour in COLOURS if colour not in present]
    if rng.random() < 0.5 or not absent:
        colour, answer = rng.choice(present), "yes"
    else:
        colour, answer = rng.choice(absent), "no"
    return f"Is there {_article(colour)} {colour} mark?", answer


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def any_question(scene: GridScene, rng: random.Random, first: str) -> tuple[str, str, str]:
    """(category, question, answer), trying ``first`` and then the others (``exists`` always has one)."""
    order = [first] + [category for category in CATEGORIES if category != first]
    for category in order:
        pair = question(scene, category, rng)
        if pair is not None:
            return category, *pair
    raise AssertionError("an 'exists' question is always possible")


def corpus(limit: int = 600) -> list[str]:
    """Text in the style of the set, for training its tokenizer."""
    rng = random.Random(54321)
    texts = []
    for index in range(limit):
        scene = random_scene(rng)
        texts.append(caption(scene))
        category, text, answer = any_question(scene, rng, CATEGORIES[index % len(CATEGORIES)])
        texts.append(text)
    # every answer as it stands in a reply, so that each is one token
    return texts + [word for word in [*COLOURS, *KINDS, "yes", "no"] for _ in range(50)]


def _conversation(turns: list[tuple[str, str]]) -> list[dict]:
    """The first question before the image: the model reads the image knowing what is asked (with
    the image first, the tiny language model learnt only the text's prior, see docs/eval.md)."""
    messages = []
    for index, (text, answer) in enumerate(turns):
        messages.append({"from": "human", "value": text + ("\n<image>" if index == 0 else "")})
        messages.append({"from": "gpt", "value": answer})
    return messages


def _scenes(root: Path, split: str, count: int, seed: int) -> list[tuple[GridScene, str]]:
    rng = random.Random(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    scenes = []
    for index in range(count):
        scene = random_scene(rng)
        name = f"{split}/{split}_{index:05d}.png"
        draw_scene(scene).save(root / "images" / name)
        scenes.append((scene, name))
    return scenes


def generate(
    root: str | Path, train_images: int = TRAIN_IMAGES, heldout_images: int = HELDOUT_IMAGES
) -> Path:
    """Write the set under ``root`` (images/, captions.json, sft_train.json, heldout.json)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    question_rng = random.Random(11)
    captions, conversations, heldout = [], [], []
    for scene, name in _scenes(root, "train", train_images, seed=3):
        sample_id = Path(name).stem
        captions.append(
            {
                "id": sample_id,
                "image": name,
                "conversations": _conversation([("Describe the image.", caption(scene))]),
            }
        )
        # the kinds in a fresh order for every image: with a fixed order the turn's position
        # alone would tell the kind of question (held-out questions are all first turns)
        turns = []
        for first in question_rng.sample(CATEGORIES, QUESTIONS_PER_TRAIN_IMAGE):
            _, text, answer = any_question(scene, question_rng, first)
            turns.append((text, answer))
        conversations.append(
            {"id": sample_id, "image": name, "conversations": _conversation(turns)}
        )
    for index, (scene, name) in enumerate(_scenes(root, "heldout", heldout_images, seed=4)):
        category, text, answer = any_question(
            scene, question_rng, CATEGORIES[index % len(CATEGORIES)]
        )
        heldout.append(
            {
                "id": Path(name).stem,
                "image": name,
                "category": category,
                "answer": answer,
                "conversations": _conversation([(text, answer)]),
            }
        )
    for file_name, records in (
        ("captions.json", captions),
        ("sft_train.json", conversations),
        ("heldout.json", heldout),
    ):
        (root / file_name).write_text(json.dumps(records, indent=1))
    (root / "VERSION").write_text(str(GRID_VERSION))
    return root


def ensure_grid(root: str | Path) -> Path:
    """The set at ``root``, generated there on first use (atomically, safe across ranks)."""
    return build_once(Path(root), is_complete=_is_current, build=generate)


def _is_current(root: Path) -> bool:
    return has_version(root, GRID_VERSION)


# ---- the base model ------------------------------------------------------------------------

SUB_BLOCKS = ((0, 5), (5, 9), (9, 14))  # pixel rows / columns of the 3 x 3 sub-blocks of a patch
ANCHOR = 4.0  # constant features after the colour ones: the layernorm keeps absolute levels


def fixed_patch_encoder(vision_tower) -> None:
    """Set a one-layer CLIP vision model to report, per patch, its mean colour in each of 3 x 3
    sub-blocks (27 features), plus constant anchors; in place.

    LLaVA reads the layer -2 output of a one-layer tower: the pre-layernormed patch embeddings.
    The patch embedding (a 14 x 14 convolution) averages the normalised pixels of each sub-block
    and channel; the position embedding adds the same anchor vector to every token (positions
    reach the language model through RoPE), so the layernorm divides every token by about the
    same spread and colour, brightness and the layout inside the cell survive it. The layernorm
    then drops the anchors (weight 0 outside the 27 features): what leaves the tower is the cell's
    colours, not a large constant shared by every token.
    """
    embeddings = getattr(
        vision_tower, "vision_model", vision_tower
    ).embeddings  # older transformers nest it
    hidden = embeddings.patch_embedding.out_channels
    if len(SUB_BLOCKS) ** 2 * 3 + 8 > hidden:
        raise ValueError(
            f"the fixed patch encoder needs a vision hidden size of at least 35, got {hidden}"
        )
    weight = torch.zeros_like(embeddings.patch_embedding.weight)  # (hidden, 3, 14, 14)
    feature = 0
    for channel in range(3):
        for top, bottom in SUB_BLOCKS:
            for left, right in SUB_BLOCKS:
                weight[feature, channel, top:bottom, left:right] = 1.0 / (
                    (bottom - top) * (right - left)
                )
                feature += 1
    anchor = torch.zeros(hidden)
    anchor[feature : feature + 8] = torch.tensor([ANCHOR, -ANCHOR] * 4)
    layernorm = getattr(vision_tower, "vision_model", vision_tower).pre_layrnorm
    with torch.no_grad():
        embeddings.patch_embedding.weight.copy_(weight)
        embeddings.position_embedding.weight.copy_(
            anchor.expand_as(embeddings.position_embedding.weight)
        )
        embeddings.class_embedding.zero_()
        layernorm.weight.zero_()[:feature] = 1.0
        layernorm.bias.zero_()


def grid_base(
    path: str | Path, layers: int = LLM_LAYERS, hidden: int = LLM_HIDDEN, seed: int = 0
) -> Path:
    """Write the study's base checkpoint to ``path``, with its parts in ``vision_tower/`` and ``llm/``."""
    model, processor = tiny_llava(
        "llava",
        layers=layers,
        hidden=hidden,
        vision_hidden=64,
        seed=seed,
        image_size=IMAGE_SIZE,
        vision_layers=1,
        tokenizer_texts=corpus(),
        eos_token="<|im_end|>",
        template="chatml",
    )
    fixed_patch_encoder(model.model.vision_tower)
    path = save_llava_with_parts(model, processor, Path(path))
    (path / "VERSION").write_text(BASE_VERSION)
    return path


def base_is_current(path: Path) -> bool:
    return (path / "config.json").is_file() and has_version(path, BASE_VERSION)
