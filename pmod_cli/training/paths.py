"""Where a recipe's run reads and writes: its data file and image folder (``tiny:`` names
resolved), and the checkpoint in its output directory that ``--resume`` continues from. The
stages and the ``--dry-run`` plan read them alike."""

from __future__ import annotations

from pathlib import Path

from ..data.tiny import default_image_folder, resolve_name
from ..errors import UserError
from .checkpoints import last_checkpoint
from .recipe import Recipe


def data_paths(recipe: Recipe) -> tuple[Path, Path]:
    data_path = Path(resolve_name(recipe.data.path))
    image_folder = (
        Path(resolve_name(recipe.data.image_folder))
        if recipe.data.image_folder
        else default_image_folder(data_path)
    )
    return data_path, image_folder


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from; refuses to mix with an earlier run. Deletes nothing."""
    previous = last_checkpoint(output_dir)
    if resume:
        if previous is None:
            raise UserError(
                f"--resume: no checkpoint-N directory in {output_dir}; run without --resume to start"
            )
        return previous
    if previous is not None and not overwrite:
        raise UserError(
            f"{output_dir} holds checkpoints of an earlier run; pass --resume to continue it, "
            "or --set train.overwrite_output_dir=true to start over"
        )
    return None
