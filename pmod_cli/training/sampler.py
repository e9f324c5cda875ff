"""``train.group_by_modality_length``: each optimizer step takes samples of one modality.

LLaVA's trainer groups its batches this way: a step's samples all carry an image, or none does,
and samples of similar length share a micro-batch. A text-only micro-batch then never waits on
the vision tower, and little of a micro-batch is padding.

The order is a pure function of (seed, epoch), so a resumed run sees the batches the
uninterrupted one would. The HF Trainer hands consecutive micro-batches of this order to the
processes in turn, so a global batch is ``global_batch_size`` consecutive indices:

1. the samples with an image and the text-only ones are shuffled apart and cut into global
   batches;
2. inside a global batch, samples are sorted by length and cut into micro-batches, which are
   shuffled (so no process always gets the longest);
3. the full global batches of both modalities are shuffled together; the two incomplete ones
   (if any) end the epoch as one mixed batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def modality_lengths(records, indices: Sequence[int]) -> list[int]:
    """Per usable sample: its length in words (LLaVA's cheap estimate), positive when it has an
    image or a video, negative when it is text-only (never 0)."""
    lengths = []
    for index in indices:
        record = records[int(index)]
        words = sum(len(str(turn.get("value", "")).split()) for turn in record["conversations"])
        has_media = any(record.get(key) not in (None, "", []) for key in ("image", "video"))
        lengths.append(max(words, 1) if has_media else -max(words, 1))
    return lengths


def modality_grouped_order(
    lengths: Sequence[int], global_batch: int, micro_batch: int, generator: torch.Generator
) -> list[int]:
    """Positions 0..len(lengths)-1 in the order described in the module docstring."""
    groups = [
        [i for i, length in enumerate(lengths) if length > 0],
        [i for i, length in enumerate(lengths) if length < 0],
    ]
    full, rest = [], []
    for group in groups:
        shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        batches = [shuffled[i : i + global_batch] for i in range(0, len(shuffled), global_batch)]
        if batches and len(batches[-1]) < global_batch:
            rest.extend(batches.pop())
        full.extend(_length_grouped(batch, lengths, micro_batch, generator) for batch in batches)
    order = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if rest:
        order.append(_length_grouped(rest, lengths, micro_batch, generator))
    return [index for batch in order for index in batch]


def _length_grouped(
    batch: list[int], lengths: Sequence[int], micro_batch: int, generator: torch.Generator
) -> list[int]:
    """One global batch: sorted by length, cut into micro-batches, micro-batches shuffled."""
    ordered = sorted(batch, key=lambda i: abs(lengths[i]), reverse=True)
    micro = [ordered[i : i + micro_batch] for i in range(0, len(ordered), micro_batch)]
    return [i for k in torch.randperm(len(micro), generator=generator).tolist() for i in micro[k]]


class ModalityLengthSampler(torch.utils.data.Sampler):
    """Dataset positions in ``modality_grouped_order`` for each epoch (``set_epoch``)."""

    def __init__(self, lengths: Sequence[int], global_batch: int, micro_batch: int, seed: int):
        self.lengths = list(lengths)
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(
            modality_grouped_order(self.lengths, self.global_batch, self.micro_batch, generator)
        )
