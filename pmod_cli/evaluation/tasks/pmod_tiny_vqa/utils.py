"""Functions of the pmod_tiny_vqa tasks (loaded by lmms-eval from the task YAMLs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
from PIL import Image

from pmod_cli.data.synthetic import COLOURS, NUMBER_WORDS, SHAPES
from pmod_cli.data.tiny import resolve_tiny_path

IMAGE_PREFIX = "<image>\n"


def process_docs(placeholder: datasets.Dataset) -> datasets.Dataset:
    """The placeholder row names the held-out JSON; build it if absent and load its questions."""
    heldout = resolve_tiny_path(placeholder[0]["source"])  # generated on first use
    image_root = heldout.parent / "images"
    records = json.loads(heldout.read_text())
    docs = []
    for record in records:
        question = record["conversations"][0]["value"]
        docs.append(
            {
                "id": record["id"],
                "image_path": str(image_root / record["image"]),
                # the question as the model was trained on it, minus the image placeholder
                "question": question.removeprefix(IMAGE_PREFIX),
                "answer": record["answer"],
                "category": record["category"],
            }
        )
    return datasets.Dataset.from_list(docs)


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(Path(doc["image_path"])).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def normalise(answer: str) -> str:
    """Lower case, first line, no surrounding punctuation or spaces: 'Red.' -> 'red'."""
    first_line = answer.strip().split("\n", 1)[0]
    return re.sub(r"^[\W_]+|[\W_]+$", "", first_line.lower())


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}


def doc_to_choice(doc: dict) -> list[str]:
    if doc["category"] == "colour":
        return list(COLOURS)
    if doc["category"] == "shape":
        return list(SHAPES)
    if doc["category"] == "count":
        return [str(count) for count in range(max(NUMBER_WORDS) + 1)]
    # position: the two sides the question offers
    return ["left", "right"] if doc["answer"] in ("left", "right") else ["top", "bottom"]


def doc_to_target_index(doc: dict) -> int:
    return doc_to_choice(doc).index(doc["answer"])
