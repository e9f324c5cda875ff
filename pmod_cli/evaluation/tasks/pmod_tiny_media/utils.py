"""Functions of the pmod_tiny_video and pmod_tiny_multi_image tasks (loaded by lmms-eval from their YAMLs)."""

from __future__ import annotations

import json
import re

import datasets
from PIL import Image

from pmod_cli.data.tiny import resolve_tiny_path

# the questions, answers and scoring of the tiny image task (its YAMLs name them from here)
from pmod_cli.evaluation.tasks.pmod_tiny_vqa.utils import (  # noqa: F401
    doc_to_text,
    normalise,
    process_results,
)

PLACEHOLDERS = re.compile(r"^(?:<image>\n|<video>\n)+")


def _docs(placeholder: datasets.Dataset, field: str) -> datasets.Dataset:
    """The placeholder row names the held-out JSON; build the media set if absent and load its
    questions, with the paths of each one's ``field`` ("video" or "image")."""
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
