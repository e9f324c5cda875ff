"""What a checkpoint must pass before it is published, and what a failed save tells the user.

- ``first_non_finite(model, optimizer)``: the first weight or optimizer-state tensor holding a
  NaN or an infinity (a diverged run), read in place (ZeRO-3: this process's partition);
- ``checkpoint_bytes(model, optimizer)``: about how much disk one checkpoint takes (weights +
  optimizer state), for the message when the disk is full;
- ``is_out_of_space(err, directory, needed)``: whether a failed save ran out of disk space
  (safetensors, torch and plain file writes each report it their own way).
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint

STAGING_DIR = ".incomplete"
RECIPE_FILE = "recipe.toml"
# texts of the errors that mean "disk full": OSError's, safetensors' (Rust io::Error), quota
_NO_SPACE_TEXTS = (
    "No space left on device",
    "os error 28",
    "StorageFull",
    "Disk quota exceeded",
    "os error 122",
)
# bytes per trained parameter DeepSpeed's ZeRO optimizers keep: fp32 master weights + two Adam moments
_ZERO_OPTIMIZER_BYTES = 12


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest complete ``checkpoint-N`` in ``output_dir`` (staged ones are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = get_last_checkpoint(str(output_dir))
    return Path(found) if found else None


# ---- finite weights -----------------------------------------------------------------------


def _is_finite(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    tensor = tensor.detach()
    # amax / amin propagate NaN and reach +-inf without a temporary the size of the tensor
    return bool(torch.isfinite(torch.stack([tensor.amax(), tensor.amin()])).all())


def _optimizer_states(optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    state = getattr(
        optimizer, "state", None
    )  # accelerate's and DeepSpeed's wrappers pass it through
    if not state:
        return
    for index, values in enumerate(state.values()):
        for key, value in values.items():
            if torch.is_tensor(value):
                yield f"optimizer state {key} #{index}", value


def first_non_finite(model: torch.nn.Module, optimizer=None) -> str | None:
    """The name of the first parameter or optimizer-state tensor with a NaN or infinity."""
    for name, parameter in model.named_parameters():
        local = getattr(
            parameter, "ds_tensor", parameter
        )  # ZeRO-3 keeps this process's share there
        if not _is_finite(local):
            return name
    for name, tensor in _optimizer_states(optimizer):
        if not _is_finite(tensor):
            return name
    return None


# ---- disk space ---------------------------------------------------------------------------


@dataclass
class CheckpointSize:
    weights: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer


def checkpoint_bytes(
    model: torch.nn.Module, optimizer=None, deepspeed: bool = False, trained_only: bool = False
) -> CheckpointSize:
    """About the bytes of one checkpoint: the weights as they are held (``trained_only``: those
    that train, as a LoRA adapter directory holds), plus the optimizer state (measured; under
    DeepSpeed, 12 bytes per trained parameter: its fp32 master copy and Adam's two moments,
    summed over processes). Tokenizer, RNG and trainer state files are small."""
    weights = trained = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3: the full size
        if parameter.requires_grad or not trained_only:
            weights += count * parameter.element_size()
        trained += count if parameter.requires_grad else 0
    if deepspeed:
        optimizer_bytes = trained * _ZERO_OPTIMIZER_BYTES
    else:
        optimizer_bytes = sum(t.numel() * t.element_size() for _, t in _optimizer_states(optimizer))
    return CheckpointSize(weights, optimizer_bytes)


def free_bytes(directory: Path) -> int:
    """Free space where ``directory`` is (or would be)."""
    directory = Path(directory)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_out_of_space(err: BaseException, directory: Path, needed: int) -> bool:
    """Whether a save failed for want of disk space. torch's writer says only "file write
    failed", so a failure with less free space than a checkpoint needs counts too."""
    for error in _chain(err):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in _NO_SPACE_TEXTS):
            return True
    return free_bytes(directory) < needed


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")
