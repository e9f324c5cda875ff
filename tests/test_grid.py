"""The grid set and its base (the study's task): prompt shape, questions, the fixed patch encoder."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from pmod_cli.data import grid
from pmod_cli.data.prompts import build_prompt


@pytest.fixture(scope="module")
def grid_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    grid.generate(root / "set", train_images=8, heldout_images=48)
    base = grid.grid_base(root / "base")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return (
        root / "set",
        AutoModelForImageTextToText.from_pretrained(base).eval(),
        AutoProcessor.from_pretrained(base),
    )


def test_prompts_have_256_vision_and_at_most_40_text_tokens(grid_set):
    root, model, processor = grid_set
    from PIL import Image

    for record in json.loads((root / "heldout.json").read_text()):
        question = record["conversations"][0]["value"]
        prompt = build_prompt(processor, question, 1)
        # the question comes before the image, in evaluation as in training
        assert prompt.index(question.split("\n")[0]) < prompt.index(processor.image_token)
        inputs = processor(
            text=[prompt],
            images=[Image.open(root / "images" / record["image"])],
            return_tensors="pt",
        )
        vision = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert vision == 256
        assert inputs["input_ids"].shape[1] - vision <= 40
    # a reply ends in the token generation stops at, and every answer is one token
    assert processor.tokenizer.eos_token == "<|im_end|>"
    for answer in [*grid.COLOURS, *grid.KINDS, "yes", "no", "3", "4", "5", "6"]:
        assert len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) == 1, answer


def test_questions_are_answered_by_the_scene_and_balanced():
    rng = random.Random(3)
    answers: dict[str, Counter] = {category: Counter() for category in grid.CATEGORIES}
    for _ in range(400):
        scene = grid.random_scene(rng)
        names = [(mark.colour, mark.kind) for mark in scene.marks]
        for category in grid.CATEGORIES:
            pair = grid.question(scene, category, rng)
            if pair is None:
                continue
            text, answer = pair
            answers[category][answer] += 1
            words = text.rstrip("?").split()
            if category == "colour":  # "What colour is the ring?": exactly one ring, of that colour
                kinds = [kind for _, kind in names]
                assert kinds.count(words[-1]) == 1 and names[kinds.index(words[-1])][0] == answer
            elif category == "count":
                assert len(names) == int(answer)
            elif category == "exists":  # "Is there a blue mark?"
                assert any(colour == words[-2] for colour, _ in names) == (answer == "yes")
    assert set(answers["count"]) == {"3", "4", "5", "6"}
    assert min(answers["count"].values()) > 0.15 * sum(answers["count"].values())
    assert abs(answers["exists"]["yes"] - answers["exists"]["no"]) < 0.2 * sum(
        answers["exists"].values()
    )


def test_the_fixed_patch_encoder_reports_each_cells_colours(grid_set):
    """What LLaVA reads from the tower (layer -2 of one layer: the patch embeddings, layernormed)
    is an affine map of the mean normalised pixels of each 3 x 3 sub-block of every patch."""
    root, model, processor = grid_set
    from PIL import Image

    image = Image.open(next((root / "images" / "heldout").iterdir()))
    pixels = processor.image_processor(images=[image], return_tensors="pt")[
        "pixel_values"
    ]  # (1, 3, 224, 224)
    with torch.no_grad():
        features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][
            0, 1:
        ]
    patches = pixels[0].unfold(1, 14, 14).unfold(2, 14, 14)  # (3, 16, 16, 14, 14)
    blocks = [(0, 5), (5, 9), (9, 14)]
    means = torch.stack(
        [
            patches[c, :, :, a:b, d:e].mean(dim=(-1, -2))
            for c in range(3)
            for a, b in blocks
            for d, e in blocks
        ],
        dim=-1,
    ).reshape(256, 27)
    anchors = torch.tensor([grid.ANCHOR, -grid.ANCHOR] * 4).expand(256, 8)
    raw = torch.cat([means, anchors, torch.zeros(256, features.shape[1] - 35)], dim=1)
    expected = torch.nn.functional.layer_norm(raw, raw.shape[-1:])
    expected[:, 27:] = 0  # the anchors steady the layernorm and are dropped from its output
    assert torch.allclose(features, expected, atol=1e-4)
    # marks and background differ: the features carry the image
    assert features.std(dim=0)[:27].min() > 0.01


def test_the_turn_of_a_training_question_does_not_tell_its_kind(grid_set):
    """Held-out questions are all first turns: if the training turns came in a fixed order of
    kinds, a model could answer the kind of question the position implies without reading it."""
    root, _, _ = grid_set
    prefixes = {
        "What colour": "colour",
        "What shape": "kind",
        "How many": "count",
        "Is there": "exists",
    }
    first_turns = Counter()
    for record in json.loads((root / "sft_train.json").read_text()):
        questions = [
            turn["value"].removeprefix("<image>\n") for turn in record["conversations"][::2]
        ]
        kinds = [next(k for p, k in prefixes.items() if q.startswith(p)) for q in questions]
        first_turns[kinds[0]] += 1
    assert len(first_turns) >= 3, first_turns
