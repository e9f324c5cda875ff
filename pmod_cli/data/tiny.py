"""The embedded tiny default: small models, data sets and a study base built locally, with no
network, in a few seconds, and named in recipes and flags as ``tiny:<relative path>``.

``build_tiny_base(path)`` writes a base checkpoint (loadable with ``from_pretrained``; the models
are built in ``tiny_build.py``) with its parts in ``path/vision_tower`` and ``path/llm`` so recipes
can also build a model "from parts". Assets the recipes name as ``tiny:<relative path>``
(``tiny:base``, ``tiny:shapes/sft_train.json``, ``tiny:media/sft_train.json``, ``tiny:grid_base``)
live in the pmod cache (``$PMOD_CACHE`` or ``~/.cache/pmod``) and are built on first use.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from ..errors import UserError
from ..model.loading import quiet_progress_bars
from . import media, synthetic
from .cache import build_once
from .grid import base_is_current, ensure_grid, grid_base
from .tiny_build import QWEN_VL_LAYOUTS, save_llava_with_parts, tiny_llava, tiny_qwen_vl

# bump when the tiny base changes, so cached copies are rebuilt
TINY_VERSION = 1
TINY_PREFIX = "tiny:"
# tiny:<name> -> layout of the base checkpoint
TINY_BASES = {
    "base": "llava",
    "base_next": "llava_next",
    "base_onevision": "llava_onevision",
    "base_qwen2_5_vl": "qwen2_5_vl",
    "base_qwen3_vl": "qwen3_vl",
}


def cache_root() -> Path:
    return Path(os.environ.get("PMOD_CACHE") or Path.home() / ".cache" / "pmod")


def tiny_root() -> Path:
    return cache_root() / f"tiny-v{TINY_VERSION}"


def build_tiny_base(path: str | Path | None = None, layout: str = "llava") -> Path:
    """The tiny default base checkpoint, with its parts in ``vision_tower/`` and ``llm/``.

    Deterministic (fixed seeds). With ``path=None`` it goes to the pmod cache and is built only
    once: concurrent ranks wait for the first one, which writes to a temporary directory renamed
    into place (``cache.build_once``); a complete copy in place is never replaced.
    """
    name = next(name for name, base_layout in TINY_BASES.items() if base_layout == layout)
    final = Path(path) if path is not None else tiny_root() / name
    return build_once(
        final, is_complete=_has_config, build=partial(_write_tiny_base, layout=layout)
    )


def _has_config(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def _write_tiny_base(directory: Path, layout: str) -> None:
    # built on first use inside a command: its progress bars would bury the command's own output
    with quiet_progress_bars():
        _save_tiny_base(directory, layout)


def _save_tiny_base(directory: Path, layout: str) -> None:
    if layout in QWEN_VL_LAYOUTS:  # trained from the whole checkpoint (model.checkpoint)
        model, processor = tiny_qwen_vl(layout)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        return
    save_llava_with_parts(*tiny_llava(layout), directory)


def resolve_tiny_path(value: str) -> Path:
    """``tiny:<relative path>`` -> the asset in the pmod cache, built on first use."""
    relative = value[len(TINY_PREFIX) :].strip("/")
    root = tiny_root()
    head = relative.split("/", 1)[0]
    if head in TINY_BASES:
        build_tiny_base(layout=TINY_BASES[head])
    elif head == "shapes":
        synthetic.ensure_synthetic(root / "shapes")
    elif head == "media":
        media.ensure_media(root / "media")
    elif head == "grid":
        ensure_grid(root / "grid")
    elif head == "grid_base":
        build_once(root / "grid_base", is_complete=base_is_current, build=_quiet_grid_base)
    else:
        known = ", ".join(f"tiny:{name}" for name in TINY_BASES)
        raise UserError(
            f"unknown tiny asset {value!r}; known: {known}, tiny:shapes/<file>, tiny:media/<file>, "
            "tiny:grid_base, tiny:grid/<file>"
        )
    return root / relative


def _quiet_grid_base(directory: Path) -> None:
    with quiet_progress_bars():  # built on first use inside a command (see _write_tiny_base)
        grid_base(directory)


def is_tiny_path(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(TINY_PREFIX)


def resolve_name(value: str | Path) -> str:
    """A model, data or folder name as recipes and flags give it: ``tiny:...`` becomes the
    cached asset's path (built on first use); anything else (a path, a Hub id) stays as given."""
    value = str(value)  # flags may arrive as Path objects
    return str(resolve_tiny_path(value)) if is_tiny_path(value) else value


def default_image_folder(data_path: str | Path) -> Path:
    """The folder a data file's image paths are relative to when none is given: the file's own,
    except for the tiny sets (``tiny:shapes/*.json``, ``tiny:grid/*.json``), whose images are in
    their ``images`` folder."""
    data_path = Path(data_path)
    for name in ("shapes", "grid"):
        folder = tiny_root() / name
        if data_path.parent == folder or data_path.parent.resolve() == folder.resolve():
            return folder / "images"
    return data_path.parent
