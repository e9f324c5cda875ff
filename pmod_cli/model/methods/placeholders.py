"""Cut each image's run of placeholder tokens to a method's count (a method that shortens the
prompt before the language model, like ``pool``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cut_image_placeholders(
    inputs: dict,
    image_token_id: int,
    tokens: int | Sequence[int],
    pad_token_id: int,
    padding_side: str,
) -> dict:
    """Processor outputs with every image's run of placeholder tokens cut to ``tokens`` (the
    method's count; or one count per image, in the order the runs come, row by row), re-padded
    on ``padding_side``; other entries are kept as they are."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    counts = iter(tokens) if isinstance(tokens, Sequence) else None
    rows = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        ids = ids[mask.bool()]
        is_image = ids == image_token_id
        starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
        run = torch.cumsum(starts.long(), dim=0)  # which image run a token belongs to
        first = torch.zeros(int(run.max()) + 1, dtype=torch.long, device=ids.device)
        first[run[starts]] = torch.nonzero(starts).view(-1)
        place = torch.arange(len(ids), device=ids.device) - first[run]  # index inside its run
        if counts is None:
            limit = torch.full_like(first, tokens)
        else:  # run 0 is the text before the first image
            limit = torch.tensor([0] + [next(counts) for _ in first[1:]], device=ids.device)
        rows.append(ids[~is_image | (place < limit[run])])
    width = max(len(row) for row in rows)
    new_ids = torch.full(
        (len(rows), width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device
    )
    new_mask = torch.zeros(
        (len(rows), width), dtype=attention_mask.dtype, device=attention_mask.device
    )
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        new_ids[index, span] = row
        new_mask[index, span] = 1
    pooled = dict(inputs)
    pooled["input_ids"], pooled["attention_mask"] = new_ids, new_mask
    return type(inputs)(pooled) if not isinstance(inputs, dict) else pooled
