"""Methods that choose within one image span per sample, as their official code does (DART,
SparseVLM): the one-line refusals of several images in a sample and of video."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .base import MethodError

# pre-encoded or raw video inputs of a forward call (generate encodes them ahead)
_VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw")


def _one_image_only(method: str) -> str:
    return f"{method} chooses within one image per sample (its official code's one image span)"


def check_one_image(vision: torch.Tensor, method: str) -> None:
    """Refuse a forward call where a sample's vision tokens form more than one span."""
    starts = vision & ~F.pad(vision, (1, 0))[:, :-1]  # (batch, seq): each run's first token
    spans = int(starts.sum(dim=1).max())
    if spans > 1:
        raise MethodError(
            f"{_one_image_only(method)}; a sample here has {spans} images: give each sample one image"
        )


def refuse_video_hook(model, method: str):
    """A forward pre-hook on ``model`` that refuses a call with video inputs."""
    return model.register_forward_pre_hook(partial(_refuse_video, method), with_kwargs=True)


def _refuse_video(method: str, model, args, kwargs):
    encoded = kwargs.get("mm_encoder_outputs") or {}
    if encoded.get("video") is not None or any(kwargs.get(k) is not None for k in _VIDEO_INPUTS):
        raise MethodError(
            f"{_one_image_only(method)}; video inputs are not supported: give each sample one image"
        )
