"""The original LLaVA format (haotian-liu/LLaVA and its forks) translated to llava-hf.

An original checkpoint is a causal language model (``LlavaLlamaForCausalLM``,
``LlavaMistralForCausalLM``, ``LlavaQwenForCausalLM``) whose config carries the multimodal parts as
``mm_*`` keys and whose weights add the projector (``model.mm_projector.{0,2}``, mlp2x_gelu) and,
for LLaVA-NeXT, ``model.image_newline``. Its vision tower is read at load time from
``mm_vision_tower`` (a hub id or a local path); only a tower it fine-tuned
(``unfreeze_mm_vision_tower``) comes from its own weights. The prompt holds ONE placeholder id -200
per image, which the model replaces by the image features; llava-hf instead has an ``<image>``
token that its processor repeats once per feature, so the tokenizer gains that token here and the
embeddings grow with it (padded to a multiple of 64 rows as llava-hf does; the new rows are the
mean of the old ones, and are never read for ``<image>`` itself, whose positions hold image
features). LLaVA-NeXT's anyres pinpoints are (width, height) there and (height, width) in
llava-hf. What has no llava-hf equivalent (another projector, ``<im_start>`` tokens, a flat anyres
merge) is refused in one line.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import UserError
from ...runtime import tokenizer_problem
from ..chat_templates import CHAT_TEMPLATES
from ..families import get_family, image_settings, prepare_tokenizer

# config.json model_type -> the language model it wraps ("llava": the older name of llava_llama)
TEXT_MODELS = {
    "llava": "llama",
    "llava_llama": "llama",
    "llava_mistral": "mistral",
    "llava_qwen": "qwen2",
}
ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
}
# the conversation template each language model's LLaVA checkpoints were tuned with
# config keys of the multimodal wrapper, not of the language model
_WRAPPER_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "vocab_size",
    "image_aspect_ratio", "image_grid_pinpoints", "image_crop_resolution", "image_split_resolution",
    "tokenizer_model_max_length", "tokenizer_padding_side", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "tune_mm_vision_resampler", "freeze_mm_vision_resampler",
    "unfreeze_mm_vision_tower", "use_mm_proj", "max_num_patches", "s2", "s2_scales",
}  # fmt: skip
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class OriginalLayout:
    """What an original config says, checked, before any weight is read."""

    text_model: str  # "llama" | "mistral" | "qwen2"
    layout: str  # "llava" (one crop, pad or square) | "llava_next" (anyres, spatial_unpad)
    vision_tower: Path  # a local directory
    tower_from_checkpoint: bool  # a fine-tuned tower: its weights are in the checkpoint
    feature_layer: int
    select_strategy: str  # "default" drops CLIP's CLS token; "full" keeps every token
    aspect_ratio: (
        str  # pmod's data.image_aspect_ratio: "pad", "crop" (the original "square") or "anyres"
    )
    grid_pinpoints: list[list[int]] | None  # (height, width) pairs


def text_model_of(values: dict[str, Any], where: Path) -> str:
    model_type = values.get("model_type")
    text_model = TEXT_MODELS.get(model_type)
    if model_type == "llava":  # the old name serves every language model: the class tells
        text_model = next(
            (ARCHITECTURES[a] for a in values.get("architectures") or [] if a in ARCHITECTURES),
            "llama",
        )
    if model_type == "pmod_llava_llama":
        text_model = "llama"
    if text_model is None:
        raise UserError(
            f"{where} is an original LLaVA checkpoint of type {model_type!r}; pmod reads "
            f"{', '.join(sorted(TEXT_MODELS))} (Llama/Vicuna, Mistral, Qwen2 language models)"
        )
    return text_model


def read_layout(
    values: dict[str, Any], where: Path, vision_tower: str | Path | None
) -> OriginalLayout:
    """Check an original config and resolve its vision tower; a UserError names what is unsupported."""
    text_model = text_model_of(values, where)
    projector = values.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise UserError(
            f"{where} has a {projector!r} projector; llava-hf (and pmod) hold mlp2x_gelu projectors"
        )
    if values.get("mm_use_im_start_end"):
        raise UserError(
            f"{where} wraps images in <im_start>/<im_end> tokens (mm_use_im_start_end), which llava-hf has no place for"
        )
    aspect = values.get("image_aspect_ratio") or "square"
    merge = values.get("mm_patch_merge_type") or "flat"
    if aspect == "anyres" and merge == "spatial_unpad":
        layout, pinpoints = (
            "llava_next",
            _height_width_pinpoints(values.get("image_grid_pinpoints"), where),
        )
    elif aspect in ("pad", "square") and merge == "flat":
        layout, pinpoints = "llava", None
    else:
        raise UserError(
            f"{where} has image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r}; llava-hf has "
            "pad/square with flat (LLaVA-1.5) and anyres with spatial_unpad (LLaVA-NeXT)"
        )
    if values.get("max_num_patches") is not None:
        raise UserError(
            f"{where} sets max_num_patches (features resized by interpolation), which llava-hf does not do"
        )
    tower = resolve_vision_tower(values, where, vision_tower)
    tower_type = _tower_model_type(tower)
    select_feature = values.get("mm_vision_select_feature", "patch")
    if tower_type.startswith("siglip"):
        # LLaVA-NeXT's SigLIP tower drops its last layer and keeps every token
        feature_layer, strategy = -2, "full"
    elif select_feature in ("patch", "cls_patch"):
        feature_layer = int(values.get("mm_vision_select_layer", -2))
        strategy = "default" if select_feature == "patch" else "full"
    else:
        raise UserError(
            f"{where} has mm_vision_select_feature {select_feature!r}; expected patch or cls_patch"
        )
    return OriginalLayout(
        text_model=text_model,
        layout=layout,
        vision_tower=tower,
        tower_from_checkpoint=bool(values.get("unfreeze_mm_vision_tower")),
        feature_layer=feature_layer,
        select_strategy=strategy,
        aspect_ratio={"square": "crop"}.get(aspect, aspect),
        grid_pinpoints=pinpoints,
    )


def _height_width_pinpoints(pinpoints: Any, where: Path) -> list[list[int]]:
    """The original's (width, height) anyres resolutions as llava-hf's (height, width)."""
    valid = (
        isinstance(pinpoints, list)
        and pinpoints
        and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p)
            for p in pinpoints
        )
    )
    if not valid:
        raise UserError(
            f"{where} has image_grid_pinpoints {pinpoints!r}; expected a list of [width, height] pairs"
        )
    return [[height, width] for width, height in pinpoints]


def resolve_vision_tower(values: dict[str, Any], where: Path, override: str | Path | None) -> Path:
    """The vision tower's local directory: ``override``, else ``mm_vision_tower`` if it is one."""
    if override is not None:
        tower = Path(override)
        if not (tower / "config.json").is_file():
            raise UserError(
                f"--vision-tower {tower} is not a model directory (no config.json); pass the downloaded tower"
            )
        return tower
    name = values.get("mm_vision_tower") or values.get("vision_tower")
    if not name:
        raise UserError(f"{where} names no vision tower (mm_vision_tower); pass --vision-tower DIR")
    for candidate in (Path(name), where / name):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(
        f"{where} takes its vision tower from {name!r}, which is not a local directory: download it "
        f"(e.g. huggingface-cli download {name} --local-dir DIR) and pass it to pmod convert with --vision-tower DIR"
    )


def _tower_model_type(tower: Path) -> str:
    try:
        model_type = json.loads((tower / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {tower / 'config.json'}: {err}") from None
    if model_type not in ("clip", "clip_vision_model", "siglip", "siglip_vision_model"):
        raise UserError(
            f"the vision tower {tower} is a {model_type!r} model; expected CLIP or SigLIP"
        )
    return model_type


# ---- the parts, loaded -------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' errors only, and no progress bar: reading parts of a foreign checkpoint
    raises expected warnings, and a command's output is its result (or one error line)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tower(layout: OriginalLayout):
    """(vision model, its image processor) from the tower's directory."""
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    tower_class = (
        SiglipVisionModel
        if _tower_model_type(layout.vision_tower).startswith("siglip")
        else CLIPVisionModel
    )
    try:
        with _quiet_transformers():  # a full CLIP model: its text half is expectedly unused
            tower = tower_class.from_pretrained(str(layout.vision_tower))
        image_processor = AutoImageProcessor.from_pretrained(str(layout.vision_tower))
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load the vision tower {layout.vision_tower}: {str(err).splitlines()[0]}"
        ) from None
    return tower, image_processor


def load_tokenizer(source: Path, vocab_size: int):
    """The checkpoint's tokenizer with an ``<image>`` token (and a pad token), and the new vocab size."""
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():  # it reads the config of a model type it does not know
            tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        detail = tokenizer_problem(source) or str(err).splitlines()[0]
        raise UserError(f"cannot load the tokenizer of {source}: {detail}") from None
    prepare_tokenizer(tokenizer)
    needed = len(tokenizer)
    new_vocab = vocab_size if needed <= vocab_size else math.ceil(needed / 64) * 64
    return tokenizer, new_vocab


def build_processor(layout: OriginalLayout, tokenizer, base_image_processor, vision_config):
    """The family's processor: the tower's image settings, the checkpoint's aspect mode, the
    family's chat template for its language model."""
    family = get_family(layout.layout)
    images = family.image_processor(
        image_settings(base_image_processor), layout.aspect_ratio, layout.grid_pinpoints
    )
    template = CHAT_TEMPLATES[family.template_name(layout.text_model)]
    return family.build_processor(
        tokenizer, images, vision_config, layout.select_strategy, template
    )


def build_config(
    values: dict[str, Any],
    layout: OriginalLayout,
    vision_config,
    vocab_size: int,
    image_token_id: int,
):
    """The llava-hf ``LlavaConfig`` / ``LlavaNextConfig`` of an original config."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    text_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[
        layout.text_model
    ]
    text_values = {
        key: value
        for key, value in values.items()
        if key not in _WRAPPER_KEYS
        and not key.startswith(("mm_", "mod_"))
        and not (key == "rope_scaling" and value is None)  # transformers 5 reads rope_theta alone
    }
    text_config = text_class(**text_values, vocab_size=vocab_size)
    features = (vision_config.image_size // vision_config.patch_size) ** 2
    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=layout.feature_layer,
        vision_feature_select_strategy=layout.select_strategy,
        projector_hidden_act="gelu",  # mlp2x_gelu: Linear, GELU, Linear
        image_seq_length=features
        + int(layout.select_strategy == "full" and vision_config.model_type.startswith("clip")),
        tie_word_embeddings=bool(values.get("tie_word_embeddings", False)),
    )
    family = get_family(layout.layout)
    return family.dense_config_class(**common, **family.config_options(layout.grid_pinpoints))


# ---- weights -----------------------------------------------------------------------------------


def hf_weight_name(name: str) -> str | None:
    """llava-hf's module name for an original weight; None for what the original loader ignores."""
    if name == "lm_head.weight" or name == "model.image_newline":
        return name
    if name.startswith(("model.embed_tokens.", "model.norm.")):
        return "model.language_model." + name.removeprefix("model.")
    match = _LAYER_KEY.match(name)
    if match:
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved
            return None
        return f"model.language_model.layers.{match.group(1)}.{match.group(2)}"
    for index, linear in (("0", "linear_1"), ("2", "linear_2")):
        prefix = f"model.mm_projector.{index}."
        if name.startswith(prefix):
            return f"model.multi_modal_projector.{linear}." + name.removeprefix(prefix)
    raise UserError(
        f"unexpected weight {name!r}: not part of an original LLaVA checkpoint pmod can read"
    )


TOWER_PREFIX = "model.vision_tower.vision_tower."


def split_weights(
    weights: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(llava-hf weights without the tower, the checkpoint's own tower weights by their tower name)."""
    hf_weights, tower_weights = {}, {}
    for name, tensor in weights.items():
        if name.startswith(TOWER_PREFIX):
            tower_weights[name.removeprefix(TOWER_PREFIX)] = tensor
            continue
        hf_name = hf_weight_name(name)
        if hf_name is not None:
            hf_weights[hf_name] = tensor
    return hf_weights, tower_weights


def tower_weights_for_llava(
    tower, checkpoint_tower: dict[str, torch.Tensor], from_checkpoint: bool, where: Path
):
    """The tower's weights under llava-hf's names (``model.vision_tower.*``).

    A fine-tuned tower's weights come from the checkpoint (saved as ``vision_model.*``), the
    others from the tower's directory, as the original loader does."""
    result = {}
    for name, tensor in tower.state_dict().items():
        if from_checkpoint:
            saved = "vision_model." + name.removeprefix("vision_model.")
            if saved not in checkpoint_tower or checkpoint_tower[saved].shape != tensor.shape:
                raise UserError(
                    f"{where} fine-tuned its vision tower (unfreeze_mm_vision_tower), and its "
                    f"{TOWER_PREFIX}{saved} does not fit the tower given; pass the tower it was trained with"
                )
            tensor = checkpoint_tower[saved]
        result["model.vision_tower." + name] = tensor
    return result


def check_projector_input(
    weights: dict[str, torch.Tensor], tower_hidden: int, tower: Path, where: Path
) -> None:
    """The projector reads features of the tower's width (else: the wrong tower)."""
    projector = weights.get("model.multi_modal_projector.linear_1.weight")
    if projector is None:
        raise UserError(
            f"{where} has no model.mm_projector.0.weight: not a LLaVA checkpoint with a projector"
        )
    if projector.shape[1] != tower_hidden:
        raise UserError(
            f"the vision tower {tower} gives {tower_hidden}-wide features, but the projector of {where} "
            f"reads {projector.shape[1]}: pass the tower it was trained with"
        )


def grow_vocabulary(weights: dict[str, torch.Tensor], vocab_size: int) -> None:
    """Pad the input and output embeddings to ``vocab_size`` rows (the mean of the old rows), in place."""
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        table = weights.get(name)
        if table is None or table.shape[0] >= vocab_size:
            continue
        mean = table.float().mean(dim=0, keepdim=True).to(table.dtype)
        weights[name] = torch.cat([table, mean.expand(vocab_size - table.shape[0], -1)], dim=0)
