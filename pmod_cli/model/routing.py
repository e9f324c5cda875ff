"""Recording what each MoD layer kept: for visualisation, analysis and tests.

with record_routing(model) as routing:
    model(**inputs)
routing.layers[14].keep_mask  # (batch, seq) bool
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch


@dataclass
class LayerRouting:
    """One MoD layer's decision in the last recorded forward call."""

    ratio: float
    keep_mask: torch.Tensor  # (batch, seq) bool: tokens the layer processed
    vision_mask: torch.Tensor  # (batch, seq) bool: image-feature positions
    weights: torch.Tensor  # (batch, seq) normalised weight w = 1 + f(r); 1 for text
    logits: torch.Tensor  # (batch, seq) raw router scores r

    @property
    def kept_vision(self) -> torch.Tensor:
        """(batch,) vision tokens each sample kept."""
        return (self.keep_mask & self.vision_mask).sum(dim=1)


@dataclass
class RoutingRecord:
    layers: dict[int, LayerRouting] = field(default_factory=dict)
    calls: list[dict[int, LayerRouting]] = field(default_factory=list)

    def add(self, layer_idx, ratio, keep, vision, weights, logits) -> None:
        entry = LayerRouting(
            ratio,
            keep.detach().cpu(),
            vision.detach().cpu(),
            weights.detach().float().cpu(),
            logits.detach().float().cpu(),
        )
        if layer_idx in self.layers or not self.calls:  # a new forward call starts
            self.calls.append({})
            if layer_idx in self.layers:
                self.layers = {}
        self.layers[layer_idx] = entry
        self.calls[-1][layer_idx] = entry


_ACTIVE: ContextVar[RoutingRecord | None] = ContextVar("pmod_routing_record", default=None)


def active_recorder() -> RoutingRecord | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def record_routing(model=None) -> Iterator[RoutingRecord]:
    """Record every MoD layer's decision inside the block; ``layers`` holds the last call's."""
    with recording(RoutingRecord()) as record:
        yield record


@contextlib.contextmanager
def recording(recorder):
    """Hand every MoD layer's decision inside the block to ``recorder``: anything with
    ``RoutingRecord.add``'s signature (training counts kept tokens on the device with one)."""
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
