"""Functions of the pmod_tiny_video and pmod_tiny_multi_image tasks (loaded by lmms-eval from their YAMLs)."""

from __future__ import annotations

import json
import re

import datasets
from PIL import Image

PLACEHOLDERS = re.compile(r"^(?:<image>\n|<video>\n)+")


def _docs(placeholder: datasets.Dataset, field: str) -> datasets.Dataset:
    """The placeholder row names the held-out JSON; build the media set if absent and load its
    questions, with the paths of each one's ``field`` ("video" or "image")."""
    from pmod_cli.data.tiny import resolve_tiny_path

    heldout = resolve_tiny_path(placeholder[0]["source"])  # generated on first use
    docs = []
    for record in json.loads(heldout.read_text()):
        paths = record[field] if isinstance(record[field], list) else [record[field]]
        docs.append(
            {
                "id": record["id"],
                "paths": [str(heldout.parent / path) for path in paths],
                # the question as the model was trained on it, minus the placeholders
                "question": PLACEHOLDERS.sub("", record["conversations"][0]["value"]),
                "answer": record["answer"],
                "category": record["category"],
            }
        )
    return datasets.Dataset.from_list(docs)


def process_video_docs(placeholder: datasets.Dataset) -> datasets.Dataset:
    return _docs(placeholder, "video")


def process_multi_image_docs(placeholder: datasets.Dataset) -> datasets.Dataset:
    return _docs(placeholder, "image")


def video_to_visual(doc: dict) -> list[str]:
    return list(doc["paths"])  # a path: lmms-eval's convention for a video


def images_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in doc["paths"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def normalise(answer: str) -> str:
    """Lower case, first line, no surrounding punctuation or spaces: 'Left.' -> 'left'."""
    first_line = answer.strip().split("\n", 1)[0]
    return re.sub(r"^[\W_]+|[\W_]+$", "", first_line.lower())


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}
