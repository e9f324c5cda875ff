"""Where each vision token comes from: token index -> rectangle on the ORIGINAL image.

Each model family replays its processor's geometry backwards (``ModelFamily.patch_boxes``, built
on the shared ``model/families/geometry.py``), so the overlay sits on the picture the user gave,
not on the resized crop the model saw. ``PatchBox.source`` says which picture (image or video
frame) a box lies on; a box of padding the processor added reaches beyond the image.
"""

from __future__ import annotations

from ..model.families import family_for_config
from ..model.families.geometry import PatchBox


def patch_boxes_for(
    processor, model_config, image_height: int, image_width: int
) -> list[PatchBox | None]:
    """The boxes of every vision token the processor and model make of a (height, width) image:
    the model's family knows its token layout."""
    return family_for_config(model_config).patch_boxes(
        processor, model_config, image_height, image_width
    )
