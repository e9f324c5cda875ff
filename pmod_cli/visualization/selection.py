"""Which vision tokens each layer of a p-MoD model keeps for a prompt with images and a video."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..data.prompts import build_prompt, encode
from ..errors import UserError
from ..model.families import family_for_model, template_for_model
from ..model.routing import LayerRouting, record_routing
from .patches import PatchBox


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
    """Everything the figure and the table need: the pictures, where tokens sit, what layers kept."""

    pictures: list[
        np.ndarray
    ]  # (height, width, 3) uint8: the images as given, then the video's frames
    boxes: list[
        PatchBox | None
    ]  # one per vision token (box.source: its picture); None: no place (newline, CLS)
    layers: list[LayerSelection]  # every decoder layer, in order
    # per picture: "image 2", "frame 5"; empty: one image
    names: list[str] = field(default_factory=list)
    answer: str | None = None  # the model's answer to the prompt it routed

    @property
    def num_vision(self) -> int:
        return len(self.boxes)

    def name_of(self, source: int) -> str:
        return self.names[source] if self.names else ""


@torch.no_grad()
def select_tokens(
    model,
    processor,
    images: Image.Image | Sequence[Image.Image],
    prompt: str,
    answer_tokens: int = 0,
    video: np.ndarray | None = None,
) -> TokenSelection:
    """Run the prompt over ``images`` (one or several) and ``video`` ((frames, height, width, 3)
    uint8, as ``data.video.read_frames`` gives it) and read back every layer's kept vision tokens
    in its prefill; with ``answer_tokens`` the model also answers (greedy, up to that many tokens)
    in the same run."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    images = [image.convert("RGB") for image in images]
    videos = [video] if video is not None else []
    family = family_for_model(model)
    text = build_prompt(
        processor, prompt, len(images), template_for_model(model), num_videos=len(videos)
    )
    inputs = encode(processor, [text], [images], model, videos=videos)
    input_ids = inputs["input_ids"][0].cpu()
    vision_mask = family.vision_mask(inputs["input_ids"], model.config)[0].cpu()  # (seq,)
    boxes = _token_boxes(family, processor, model.config, images, video, input_ids[vision_mask])
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
        model, images, boxes, routing.calls[0] if routing.calls else {}, answer, video
    )


def selection_from_routing(
    model,
    images: Image.Image | Sequence[Image.Image],
    boxes: list[PatchBox | None],
    prefill: dict[int, LayerRouting],
    answer: str | None = None,
    video: np.ndarray | None = None,
) -> TokenSelection:
    """Every layer's kept vision tokens from the routing recorded in a prefill (``record_routing``'s
    first call), e.g. of an answer generated elsewhere (``pmod demo`` records ``ChatSession.ask``)."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    layers = []
    for index in range(len(model.retention_ratios)):
        record = prefill.get(index)
        if record is None:  # a layer that ran every token (dense, or before FastV's layer K)
            method = getattr(model, "token_method", None)
            if model.retention_ratios[index] < 1.0 and (method is None or method.needs_router):
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
    pictures = [np.asarray(image.convert("RGB")) for image in images]
    pictures += [frame for frame in video] if video is not None else []
    names = _picture_names(len(images), 0 if video is None else len(video))
    return TokenSelection(pictures, boxes, layers, names, answer)


def _picture_names(images: int, frames: int) -> list[str]:
    if images == 1 and not frames:
        return []
    return [f"image {i + 1}" for i in range(images)] + [f"frame {f + 1}" for f in range(frames)]


def _token_boxes(
    family, processor, config, images, video, vision_ids: torch.Tensor
) -> list[PatchBox | None]:
    """The box of every vision token, in token order: image tokens take the images' boxes in
    turn, video tokens the frames' (each box tagged with its picture)."""
    per_image = []
    for source, image in enumerate(images):
        layout = family.patch_boxes if len(images) == 1 else family.several_image_boxes
        per_image += _tagged(layout(processor, config, image.height, image.width), source)
    per_video = []
    if video is not None:
        frames, height, width = video.shape[:3]
        # one set of tokens per frame (Qwen-VL: per temporal patch of frames_per_step frames)
        step = family.frames_per_step(processor)
        for frame in range(0, frames, step):
            boxes = family.frame_boxes(processor, config, height, width, frames=frames)
            per_video += _tagged(boxes, len(images) + frame)
        per_video += [None] * family.video_extra_tokens
    is_image = (vision_ids == config.image_token_id).tolist()
    if sum(is_image) != len(per_image) or len(is_image) - sum(is_image) != len(per_video):
        raise RuntimeError(
            f"token mapping disagrees with the processor: {len(per_image)} + {len(per_video)} patches for "
            f"{sum(is_image)} image and {len(is_image) - sum(is_image)} video tokens"
        )
    image_boxes, video_boxes = iter(per_image), iter(per_video)
    return [next(image_boxes) if image else next(video_boxes) for image in is_image]


def _tagged(boxes: list[PatchBox | None], source: int) -> list[PatchBox | None]:
    return [dataclasses.replace(box, source=source) if box is not None else None for box in boxes]


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
