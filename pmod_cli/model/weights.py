"""A checkpoint's weight files, whole or sharded, ``.safetensors`` or ``.bin``: checked, and read safely.

    check_weight_files("runs/tiny/sft")   # a UserError naming the damaged file, else None
    read_weights("llava-v1.5-7b/")         # every tensor by its checkpoint name (foreign formats)

A download or copy that stopped early leaves a ``model.safetensors`` cut short, one bad shard
of a sharded checkpoint, a missing shard, or a ``pytorch_model.bin`` that is no longer a
readable archive. ``from_pretrained`` then fails deep inside safetensors or torch with a
traceback that names no file. The checks here read only what is cheap: a safetensors file's
header and its length (no tensor data), a shard index and the shards it names, and a
PyTorch file's archive directory (memory-mapped, so no tensor is read). Files are checked in
the order ``from_pretrained`` prefers them: safetensors first, then PyTorch pickles.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

from ..errors import UserError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# safetensors refuses headers above 100 MB; a larger length is a damaged file, not a header
MAX_HEADER_BYTES = 100_000_000
FETCH_AGAIN = "the download or copy did not finish or the file is damaged; fetch or copy it again"
# raised by torch / safetensors on a damaged file; checked by type (or, for RuntimeError, text)
_READ_ERROR_TEXTS = ("PytorchStreamReader", "central directory", "invalid load key")


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files ``from_pretrained`` will read from ``directory`` (shards named by an
    index included, whether or not they exist); empty if it holds none of the known names."""
    directory = Path(directory)
    if (directory / SAFE_WEIGHTS).is_file():
        return [directory / SAFE_WEIGHTS]
    for index_name in (SAFE_INDEX, TORCH_INDEX):
        if (directory / index_name).is_file():
            return [directory / name for name in _shard_names(directory / index_name)]
    if (directory / TORCH_WEIGHTS).is_file():
        return [directory / TORCH_WEIGHTS]
    return []


def read_file(file: Path) -> dict:
    """All tensors of one ``.safetensors`` or ``.bin`` file, on the CPU (pickles with
    ``weights_only``: a file holding code is refused)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if file.suffix == ".safetensors":
            tensors = load_file(str(file))
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{file} holds more than tensors ({_first_line(err)}); refusing to load it"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError) as err:
        raise UserError(f"cannot read {file} ({_first_line(err)}); {FETCH_AGAIN}") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(t, torch.Tensor) for t in tensors.values()
    ):
        raise UserError(f"{file} is not a file of named tensors")
    return tensors


def read_weights(directory: str | Path) -> dict:
    """Every weight of the checkpoint in ``directory``, by its name in the checkpoint, after
    ``check_weight_files``; a shard that lacks a weight its index lists is a UserError."""
    directory = Path(directory)
    files = weight_files(directory)
    if not files:
        raise UserError(
            f"{directory} holds no weights: expected {SAFE_WEIGHTS} or {TORCH_WEIGHTS}, or a sharded index "
            f"({SAFE_INDEX} or {TORCH_INDEX})"
        )
    check_weight_files(directory)
    weights = {}
    for file in files:
        weights.update(read_file(file))
    listed = next(
        (
            _weight_map(directory / name)
            for name in (SAFE_INDEX, TORCH_INDEX)
            if (directory / name).is_file()
        ),
        {},
    )
    absent = sorted(set(listed) - set(weights)) if len(files) > 1 else []
    if absent:
        raise UserError(
            f"{directory / listed[absent[0]]} lacks {absent[0]}, which its index lists; {FETCH_AGAIN}"
        )
    return weights


def check_weight_files(directory: str | Path) -> None:
    """A UserError naming the first weight file of ``directory`` that is missing, cut short or
    unreadable; nothing if they look whole (or the directory has none: ``from_pretrained``
    says so itself)."""
    for file in weight_files(directory):
        if not file.is_file():
            raise UserError(
                f"{file} is missing, though the checkpoint's shard index names it; {FETCH_AGAIN}"
            )
        if file.name.endswith(".safetensors"):
            check_safetensors_file(file)
        else:
            check_torch_file(file)


def _shard_names(index: Path) -> list[str]:
    return sorted(set(_weight_map(index).values()))


def _weight_map(index: Path) -> dict[str, str]:
    """A shard index's {weight name: shard file name}."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(
            f"{index} is not a valid shard index ({type(err).__name__}); {FETCH_AGAIN}"
        ) from None
    if not all(isinstance(name, str) and name and "/" not in name for name in names):
        raise UserError(
            f"{index} is not a valid shard index (a shard name is not a file name); {FETCH_AGAIN}"
        )
    return weight_map


def check_safetensors_file(file: Path) -> None:
    """A safetensors file: an 8-byte header length, a JSON header, then exactly the bytes the
    header's tensors cover. Anything else is a UserError naming the file."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UserError(
                f"{file} is cut short ({size} bytes, less than a safetensors header); {FETCH_AGAIN}"
            )
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > MAX_HEADER_BYTES:
            raise UserError(
                f"{file} is not a safetensors file (its first bytes are not a header length); {FETCH_AGAIN}"
            )
        if 8 + header_bytes > size:
            raise UserError(
                f"{file} is cut short: {size:,} bytes, less than its own {header_bytes:,}-byte header; {FETCH_AGAIN}"
            )
        try:
            header = json.loads(handle.read(header_bytes))
            data_end = max(
                (
                    int(info["data_offsets"][1])
                    for key, info in header.items()
                    if key != "__metadata__"
                ),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise UserError(
                f"{file} has a damaged safetensors header ({type(err).__name__}); {FETCH_AGAIN}"
            ) from None
    expected = 8 + header_bytes + data_end
    if size < expected:
        raise UserError(
            f"{file} is cut short: {size:,} bytes where its header describes {expected:,}; {FETCH_AGAIN}"
        )
    if size > expected:
        raise UserError(
            f"{file} has {size - expected:,} bytes more than its header describes; {FETCH_AGAIN}"
        )


def check_torch_file(file: Path) -> None:
    """A ``pytorch_model.bin``: its archive directory (memory-mapped) or, for the old non-zip
    format, the whole pickle must load with ``weights_only`` (as transformers loads it)."""
    import torch

    try:
        if zipfile.is_zipfile(file):
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        else:  # the legacy format (or a zip cut short, which lost its directory): read it all
            torch.load(file, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        EOFError,
        RuntimeError,
        ValueError,
        zipfile.BadZipFile,
        OSError,
    ) as err:
        raise UserError(
            f"{file} cannot be read as PyTorch weights ({_first_line(err)}); {FETCH_AGAIN}"
        ) from None


def is_weight_read_error(err: BaseException) -> bool:
    """Whether ``err`` (raised by ``from_pretrained``) means the weight files could not be read."""
    from safetensors import SafetensorError

    if isinstance(err, SafetensorError | pickle.UnpicklingError | EOFError | zipfile.BadZipFile):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _READ_ERROR_TEXTS)


def weight_read_error(directory: str | Path, err: BaseException) -> UserError:
    """The one-line error for weights that ``from_pretrained`` could not read from ``directory``
    (named by file when there is one; its error does not say which shard)."""
    files = weight_files(directory)
    where = files[0] if len(files) == 1 else directory
    return UserError(f"cannot read the weights in {where} ({_first_line(err)}); {FETCH_AGAIN}")


def _first_line(err: BaseException) -> str:
    """The error's type and first sentence (torch's messages run on for several)."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    first = text.splitlines()[0]
    first = first.split(". ")[0] if len(first) > 120 else first
    return f"{type(err).__name__}: {first}"
