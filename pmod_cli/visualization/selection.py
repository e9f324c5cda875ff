"""Which vision tokens each layer of a p-MoD model keeps for one image and prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data.prompts import build_prompt, encode
from ..errors import UserError
from ..model.families import family_for_model, template_for_model
from ..model.routing import LayerRouting, record_routing
from .patches import PatchBox, patch_boxes_for


@dataclass
class LayerSelection:
    """One decoder layer's decision over the image's vision tokens."""

    layer: int
    ratio: float  # 1.0: a dense layer, which processes every token and has no router
    kept: np.ndarray  # (n_vision,) bool, vision-token order
    weights: np.ndarray | None  # (n_vision,) router weight w = 1 + f(r); None for a dense layer

    @property
    def is_dense(self) -> bool:
        return self.weights is None

    @property
    def kept_count(self) -> int:
        return int(self.kept.sum())


@dataclass
class TokenSelection:
    """Everything the figure and the table need: the image, where tokens sit, what layers kept."""

    image: np.ndarray  # (height, width, 3) uint8, the image as given
    boxes: list[PatchBox | None]  # one per vision token; None: no place on the image (newline, CLS)
    layers: list[LayerSelection]  # every decoder layer, in order
    answer: str | None = None  # the model's answer to the prompt it routed

    @property
    def num_vision(self) -> int:
        return len(self.boxes)


@torch.no_grad()
def select_tokens(
    model, processor, image: Image.Image, prompt: str, answer_tokens: int = 0
) -> TokenSelection:
    """Run the prompt and read back every layer's kept vision tokens in its prefill; with
    ``answer_tokens`` the model also answers (greedy, up to that many tokens) in the same run."""
    image = image.convert("RGB")
    text = build_prompt(processor, prompt, 1, template_for_model(model))
    inputs = encode(processor, [text], [image], model)
    vision_mask = (
        family_for_model(model).vision_mask(inputs["input_ids"], model.config)[0].cpu()
    )  # (seq,)
    boxes = patch_boxes_for(processor, model.config, image.height, image.width)
    if len(boxes) != int(vision_mask.sum()):
        raise RuntimeError(
            f"token mapping disagrees with the processor: {len(boxes)} patches for {int(vision_mask.sum())} image tokens"
        )
    answer = None
    with record_routing(model) as routing:
        if answer_tokens:
            tokenizer = processor.tokenizer
            pad = (
                tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id
            )
            output = model.generate(
                **inputs, max_new_tokens=answer_tokens, do_sample=False, pad_token_id=pad
            )
            answer = tokenizer.decode(
                output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            ).strip()
        else:
            model(**inputs)
    return selection_from_routing(
        model, image, boxes, routing.calls[0] if routing.calls else {}, answer
    )


def selection_from_routing(
    model,
    image: Image.Image,
    boxes: list[PatchBox | None],
    prefill: dict[int, LayerRouting],
    answer: str | None = None,
) -> TokenSelection:
    """Every layer's kept vision tokens from the routing recorded in a prefill (``record_routing``'s
    first call), e.g. of an answer generated elsewhere (``pmod demo`` records ``ChatSession.ask``)."""
    layers = []
    for index in range(len(model.retention_ratios)):
        record = prefill.get(index)
        if record is None:  # a layer that ran every token (dense, or before FastV's layer K)
            method = getattr(model, "token_method", None)
            if model.retention_ratios[index] < 1.0 and (method is None or method.name == "pmod"):
                raise KeyError(f"MoD layer {index} recorded no routing in this prefill")
            layers.append(LayerSelection(index, 1.0, np.ones(len(boxes), dtype=bool), None))
            continue
        vision_mask = record.vision_mask[0]  # (seq,)
        layers.append(
            LayerSelection(
                index,
                record.ratio,
                record.keep_mask[0][vision_mask].numpy().astype(bool),
                record.weights[0][vision_mask].numpy().astype(np.float32),
            )
        )
    return TokenSelection(np.asarray(image.convert("RGB")), boxes, layers, answer)


def default_layers(ratios: list[float], count: int = 4) -> list[int]:
    """``count`` MoD layers spread evenly from the first MoD layer to the last layer."""
    candidates = [i for i, ratio in enumerate(ratios) if ratio < 1.0] or list(range(len(ratios)))
    if len(candidates) <= count:
        chosen = set(candidates)
    else:
        chosen = {candidates[round(k * (len(candidates) - 1) / (count - 1))] for k in range(count)}
    chosen.add(len(ratios) - 1)
    return sorted(chosen)


def parse_layers(layers: str | Sequence[int] | None, num_layers: int) -> list[int] | None:
    """``"2,14,26"`` (or a list) -> [2, 14, 26], checked against the model's ``num_layers``."""
    if layers is None:
        return None
    parts = layers.split(",") if isinstance(layers, str) else [str(layer) for layer in layers]
    chosen: list[int] = []
    for part in (part.strip() for part in parts):
        if not part:
            continue
        try:
            layer = int(part)
        except ValueError:
            raise UserError(
                f"--layers takes comma-separated layer numbers like 2,14,26, got {layers!r}"
            ) from None
        if not 0 <= layer < num_layers:
            raise UserError(
                f"--layers: layer {layer} is out of range; the model has {num_layers} decoder layers (0-{num_layers - 1})"
            )
        if layer not in chosen:
            chosen.append(layer)
    if not chosen:
        raise UserError(
            f"--layers takes comma-separated layer numbers like 2,14,26, got {layers!r}"
        )
    return chosen
