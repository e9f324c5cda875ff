"""``pool``: the vision tokens of each image average-pooled over their patch grid to N tokens
before the language model (a shorter prompt); every layer is dense."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .base import MethodError, TokenMethod, register_method


@register_method
@dataclass(frozen=True)
class Pool(TokenMethod):
    """Options: ``tokens`` (N, the vision tokens per image after pooling; ``--match-tflops``
    chooses it among the counts that tile the patch grid)."""

    name = "pool"
    title = "pool runs every layer on N tokens per image, its patch grid average-pooled"
    knob = "tokens"
    needs_vision_tokens = True
    tokens: int | None = None

    def __post_init__(self) -> None:
        if self.tokens is not None and self.tokens < 1:
            raise MethodError(
                f"pool needs a number of pooled tokens per image of at least 1, got {self.tokens}"
            )

    @property
    def label(self) -> str:
        return f"pool {self.tokens}"

    def check(self, num_layers: int, vision_tokens: int | None = None) -> None:
        if self.tokens is None:
            raise MethodError("pool needs tokens=N (pool:tokens=64) or --match-tflops")
        if vision_tokens is not None:
            pool_grid(vision_tokens, self.tokens)

    def check_family(self, family) -> None:
        super().check_family(family)
        if not family.single_grid_images:
            raise MethodError(
                f"pool averages one square patch grid per image; {family.title} images are not one grid"
            )

    def kept_vision_tokens(self, pmod_ratios: Sequence[float], num_vision: int) -> list[int]:
        return [self.tokens] * len(pmod_ratios)

    def entering_tokens(self, num_vision: int, crops: int = 1) -> int:
        return self.tokens

    def prompt_tokens_per_image(self) -> int | None:
        return self.tokens

    def settings(self, num_vision: int) -> list[TokenMethod]:
        return [self.replace(tokens=tokens) for tokens in pool_token_counts(num_vision)]

    def install(self, model, vision_tokens: int | None) -> None:
        grid = pool_grid(vision_tokens, self.tokens)
        model._pmod_method_hooks.append(
            model.model.multi_modal_projector.register_forward_hook(partial(_pool_projected, grid))
        )


def _pool_projected(grid: tuple[int, int], module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the projector: (images, V, hidden) -> (images, rows * columns, hidden)."""
    return pool_features(output, grid)


def pool_grid(num_vision: int, tokens: int) -> tuple[int, int]:
    """(rows, columns) of the pooled grid: ``tokens`` = rows * columns cells, as square as it
    gets, over an image's side x side patch grid of ``num_vision`` tokens."""
    side = math.isqrt(num_vision)
    if side * side != num_vision:
        raise MethodError(
            f"pool averages an image's square patch grid, but an image here has {num_vision} vision tokens "
            "(pool works with LLaVA-1.5 layouts and vision_feature_select_strategy 'default')"
        )
    if not 1 <= tokens <= num_vision:
        raise MethodError(
            f"pool's tokens must be between 1 and the {num_vision} vision tokens of an image, got {tokens}"
        )
    pairs = [
        (rows, tokens // rows)
        for rows in range(1, side + 1)
        if tokens % rows == 0 and tokens // rows <= side
    ]
    if not pairs:
        near = [n for n in pool_token_counts(num_vision) if abs(n - tokens) <= 4]
        raise MethodError(
            f"{tokens} pooled tokens do not tile a {side} x {side} patch grid (rows x columns, each at most {side}); "
            f"try {', '.join(map(str, near))}"
        )
    return min(pairs, key=lambda pair: (abs(pair[0] - pair[1]), pair[0]))


def pool_token_counts(num_vision: int) -> list[int]:
    """Every pooled count that tiles the patch grid of an image of ``num_vision`` tokens."""
    side = math.isqrt(num_vision)
    return sorted({rows * columns for rows in range(1, side + 1) for columns in range(1, side + 1)})


def pool_features(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(images, V, hidden) -> (images, rows * columns, hidden): the mean of each grid cell, in
    reading order."""
    images, num_vision, hidden = features.shape
    side = math.isqrt(num_vision)
    maps = features.transpose(1, 2).reshape(images, hidden, side, side)
    return F.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)
