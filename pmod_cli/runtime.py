"""Where and in what precision a model runs: the one reading of ``--device`` and ``--dtype``.

Every command that runs or accounts for a model takes the same spellings:

- dtype: ``bf16`` | ``bfloat16``, ``fp16`` | ``float16``, ``fp32`` | ``float32``, ``auto`` (the
  checkpoint's own), read into the short name (``bf16``, ``fp16``, ``fp32``, ``auto``);
- device: ``cpu``, ``cuda`` or ``cuda:N``; none given: CUDA when torch sees a GPU, else the CPU.

torch is imported only when a device is checked or a torch dtype is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import UserError

DTYPE_SPELLINGS = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "auto": "auto",
}
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEVICE_KINDS = ("cpu", "cuda")


def parse_dtype(value: str, *, flag: str = "--dtype", extra: Sequence[str] = ()) -> str:
    """The short name (``bf16``, ``fp16``, ``fp32``, ``auto``, or one of ``extra``) of a spelling."""
    name = str(value).strip().lower()
    if name in extra:
        return name
    if name not in DTYPE_SPELLINGS:
        choices = ", ".join([*DTYPE_SPELLINGS, *extra])
        raise UserError(f"{flag} must be one of {choices}, got {value!r}")
    return DTYPE_SPELLINGS[name]


def torch_dtype(name: str):
    """The torch dtype of a short name; ``auto`` stays the string ``"auto"`` (as transformers takes it)."""
    if name == "auto":
        return "auto"
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES[parse_dtype(name)])


def resolve_device(value: str | None, *, flag: str = "--device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, checked against the GPUs torch sees; None: the best there is."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = value.partition(":")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise UserError(f"{flag} must be cpu or cuda (cuda:N), got {value!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} cuda, but torch sees no CUDA GPU here; use {flag} cpu")
    if index and int(index) >= (count := torch.cuda.device_count()):
        raise UserError(
            f"{flag} {value}, but torch sees {count} CUDA GPU{'s' if count != 1 else ''} here "
            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
        )
    return value
