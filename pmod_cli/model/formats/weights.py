"""Reading a checkpoint's weights, whole or sharded, ``.safetensors`` or ``.bin``, safely.

``.bin`` files are pickles: they are read with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers, so a checkpoint cannot run code on the way in. An
index file (``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``) names the
shards and which weight each holds; every shard must exist, read whole and hold what the index
says, or the read stops with one line naming the file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ...errors import UserError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(directory: Path) -> tuple[list[Path], dict[str, str]]:
    """The weight files of ``directory`` and, when sharded, the index's {weight: shard} map."""
    for name in INDEX_FILES:
        index = directory / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UserError(f"cannot read the shard index {index}: {err}") from None
            shards = sorted({directory / shard for shard in weight_map.values()})
            absent = [shard for shard in shards if not shard.is_file()]
            if absent:
                raise UserError(
                    f"{index} names the shard {absent[0].name}, which is missing; download it"
                )
            return shards, weight_map
    for name in SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name], {}
    raise UserError(
        f"{directory} holds no weights: expected {' or '.join(SINGLE_FILES)} or a sharded index "
        f"({' or '.join(INDEX_FILES)})"
    )


def read_file(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` or ``.bin`` file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if file.suffix == ".safetensors":
            tensors = load_file(str(file))
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{file} holds more than tensors ({str(err).splitlines()[0]}); refusing to load it"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"cannot read {file} ({reason}): the file is truncated or corrupt; download it again"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(t, torch.Tensor) for t in tensors.values()
    ):
        raise UserError(f"{file} is not a file of named tensors")
    return tensors


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of the checkpoint in ``directory``, by its name in the checkpoint."""
    directory = Path(directory)
    files, weight_map = weight_files(directory)
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(read_file(file))
    absent = sorted(set(weight_map) - set(weights))
    if absent:
        raise UserError(
            f"{directory / weight_map[absent[0]]} lacks {absent[0]}, which its index lists: "
            "the shard is incomplete; download it again"
        )
    return weights
