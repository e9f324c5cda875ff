"""KV cache of a p-MoD layer: it holds only the tokens the layer processed.

A MoD layer's cache layer stores K/V for its kept tokens only, plus, per cached slot, whether it
holds a real token (batched samples keep different numbers of tokens, so shorter ones are padded)
and that token's original position (for sliding-window masks). Towards the rest of transformers
it reports the full sequence length seen so far, so the model's own position ids and the masks of
dense layers never depend on which layer happens to be first (layer 0 may be a MoD layer).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PMoDCacheLayer(DynamicLayer):
    """A ``DynamicLayer`` that stores a subset of the sequence."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen_tokens = 0
        self.slot_valid: torch.Tensor | None = None  # (batch, stored) bool
        self.slot_positions: torch.Tensor | None = None  # (batch, stored) long

    def record_slots(
        self, valid: torch.Tensor, positions: torch.Tensor, num_new_tokens: int
    ) -> None:
        """Remember which of the slots about to be stored are real, and where they sat."""
        if self.slot_valid is None:
            self.slot_valid, self.slot_positions = valid, positions
        else:
            self.slot_valid = torch.cat([self.slot_valid, valid], dim=1)
            self.slot_positions = torch.cat([self.slot_positions, positions], dim=1)
        self.seen_tokens += num_new_tokens

    def stored_length(self) -> int:
        return super().get_seq_length()

    # the full-sequence view that the rest of transformers reads
    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.slot_valid = self.slot_positions = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a p-MoD cache layer cannot be cropped (assisted decoding is not supported)"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.slot_valid is not None:
            self.slot_valid = self.slot_valid.index_select(0, beam_idx.to(self.slot_valid.device))
            self.slot_positions = self.slot_positions.index_select(
                0, beam_idx.to(self.slot_positions.device)
            )

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.slot_valid is not None:
            self.slot_valid = self.slot_valid.repeat_interleave(repeats, dim=0)
            self.slot_positions = self.slot_positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.slot_valid is not None:
            self.slot_valid = self.slot_valid[indices, ...]
            self.slot_positions = self.slot_positions[indices, ...]


def pmod_cache_layer(cache: Cache, layer_idx: int) -> PMoDCacheLayer:
    """The p-MoD cache layer at ``layer_idx``, installed in place of an unused dynamic one."""
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if isinstance(layer, PMoDCacheLayer):
        return layer
    if type(layer) is not DynamicLayer and not (
        isinstance(layer, DynamicLayer) and not getattr(layer, "is_initialized", False)
    ):
        raise TypeError(
            f"p-MoD layers need a DynamicCache; layer {layer_idx} of the given cache is a {type(layer).__name__}"
        )
    if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
        raise ValueError(f"cache layer {layer_idx} already holds tokens from a dense layer")
    layers[layer_idx] = PMoDCacheLayer()
    return layers[layer_idx]


def kv_cache_lengths(cache: Cache) -> list[list[int]]:
    """Per layer, per sample: how many real K/V entries the cache holds."""
    lengths = []
    for layer in cache.layers:
        if isinstance(layer, PMoDCacheLayer):
            lengths.append(
                layer.slot_valid.sum(dim=1).tolist() if layer.slot_valid is not None else []
            )
        elif getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            batch, _, stored, _ = layer.keys.shape
            lengths.append([stored] * batch)
        else:
            lengths.append([])
    return lengths


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes the cache's K and V tensors occupy (padding slots of a batch included)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
