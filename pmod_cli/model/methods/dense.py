"""``dense``: every layer processes every token (a p-MoD checkpoint's routers go unused)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import TokenMethod, register_method


@register_method
@dataclass(frozen=True)
class Dense(TokenMethod):
    name = "dense"
    title = "dense runs every token in every layer"
