"""The model and processor a recipe describes, ready for a stage.

    model, processor = build_model(recipe, stage="sft", dtype=torch.float32)

From parts (``model.vision_tower`` + ``model.llm``): the vision tower and the language model
are loaded with their weights, the tokenizer gets an ``<image>`` token (and a pad token if it
has none), and a new mlp2x_gelu connector joins them in an HF ``LlavaForConditionalGeneration``
(or ``LlavaNextForConditionalGeneration``). From a checkpoint (``model.checkpoint``): an HF
LLaVA / LLaVA-NeXT directory or hub id, dense or p-MoD. Then ``model.pretrained_connector``
loads a pretrain stage's connector, and ``apply_pmod`` converts the model unless
``pmod.enabled`` is false.

The parameters fall into four parts, the unit of freezing and of learning rates:
``vision_tower``, ``connector`` (projector, and LLaVA-NeXT's image newline), ``llm`` (decoder,
embeddings, lm_head) and ``router`` (the p-MoD routers).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..data.templates import get_template
from ..data.tiny import resolve_name
from ..errors import UserError
from ..model import apply_pmod, is_pmod_model
from .recipe import Recipe

PARTS = ("vision_tower", "connector", "llm", "router")
IMAGE_TOKEN = "<image>"
# vision config model_type -> the HF class holding only the tower
VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}


def part_of(parameter_name: str) -> str:
    """Which part a parameter of a (p-MoD) LLaVA model belongs to."""
    if ".router." in parameter_name or ".pmod_shared_router." in parameter_name:
        return "router"
    if parameter_name.startswith("model.vision_tower."):
        return "vision_tower"
    if (
        parameter_name.startswith("model.multi_modal_projector.")
        or parameter_name == "model.image_newline"
    ):
        return "connector"
    return "llm"


def trained_parts(recipe: Recipe, stage: str) -> tuple[str, ...]:
    """Pretrain trains the connector; sft the connector, LLM and routers (and maybe the tower)."""
    if stage == "pretrain":
        return ("connector",)
    parts = ("connector", "llm", "router")
    return (*parts, "vision_tower") if recipe.train.tune_vision_tower else parts


def set_trainable(model: nn.Module, parts: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Freeze everything outside ``parts``; returns {part: (trainable, total) parameter counts}."""
    counts = {part: [0, 0] for part in PARTS}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        parameter.requires_grad_(part in parts)
        counts[part][1] += parameter.numel()
        counts[part][0] += parameter.numel() if part in parts else 0
    return {part: (trainable, total) for part, (trainable, total) in counts.items()}


# ---- processor ----------------------------------------------------------------------------


def _image_processor(base, layout: str, aspect_ratio: str, grid_pinpoints: list[list[int]] | None):
    """LLaVA's image processing from a vision tower's own settings (size, crop, mean, std)."""
    from transformers import LlavaImageProcessor, LlavaNextImageProcessor

    settings = dict(
        size=dict(base.size),
        crop_size=dict(base.crop_size) if getattr(base, "crop_size", None) else None,
        image_mean=base.image_mean,
        image_std=base.image_std,
        resample=base.resample,
    )
    if (
        "height" in settings["size"] and settings["crop_size"] is None
    ):  # SigLIP: a fixed square size
        settings["crop_size"] = dict(settings["size"])
        settings["size"] = {"shortest_edge": settings["size"]["height"]}
    if layout == "llava_next":
        return LlavaNextImageProcessor(**settings, image_grid_pinpoints=grid_pinpoints)
    return LlavaImageProcessor(**settings, do_pad=aspect_ratio == "pad")


def _processor(
    tokenizer, image_processor, layout: str, vision_config, select_strategy: str, template: str
):
    from transformers import LlavaNextProcessor, LlavaProcessor

    processor_class = LlavaNextProcessor if layout == "llava_next" else LlavaProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=select_strategy,
        # CLIP puts a CLS token in front of the patches; SigLIP has none
        num_additional_image_tokens=1 if vision_config.model_type.startswith("clip") else 0,
        image_token=IMAGE_TOKEN,
        chat_template=get_template(template).jinja,
    )


def _prepare_tokenizer(tokenizer) -> bool:
    """Give the tokenizer an <image> and a pad token; True if the vocabulary grew."""
    grew = False
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        grew = True
    if tokenizer.pad_token is None:
        # Vicuna has no pad token; LLaVA pads with <unk>
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            grew = True
    tokenizer.padding_side = "right"
    return grew


# ---- building -----------------------------------------------------------------------------


def _vision_config(reference: str, local_only: bool = False):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(reference, local_files_only=local_only)
    vision = getattr(config, "vision_config", None) or config  # a full CLIP/SigLIP model holds one
    if vision.model_type not in VISION_CLASSES:
        raise UserError(
            f"model.vision_tower {reference!r} is a {config.model_type!r} model; expected a CLIP or SigLIP vision model"
        )
    return vision


def llava_config(recipe: Recipe, vision_config, text_config, image_token_id: int):
    """The HF LLaVA / LLaVA-NeXT config joining a vision tower and a language model."""
    from transformers import LlavaConfig, LlavaNextConfig

    model = recipe.model
    features = (vision_config.image_size // vision_config.patch_size) ** 2
    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=model.vision_feature_layer,
        vision_feature_select_strategy=model.vision_feature_select_strategy,
        projector_hidden_act="gelu",  # mlp2x_gelu: Linear, GELU, Linear
        image_seq_length=features,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    if model.layout == "llava_next":
        if not model.image_grid_pinpoints:
            raise UserError('model.layout = "llava_next" needs model.image_grid_pinpoints')
        return LlavaNextConfig(**common, image_grid_pinpoints=model.image_grid_pinpoints)
    return LlavaConfig(**common)


def _load(loader, reference: str, what: str, **kwargs):
    try:
        return loader(reference, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load {what} {reference!r}: {str(err).splitlines()[0]}") from None


def build_from_parts(recipe: Recipe, dtype: torch.dtype):
    """A new LLaVA model: loaded vision tower + loaded LLM + a fresh connector."""
    import transformers
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    model_section, data = recipe.model, recipe.data
    vision_ref, llm_ref = resolve_name(model_section.vision_tower), resolve_name(model_section.llm)
    vision_config = _load(_vision_config, vision_ref, "model.vision_tower")
    vision_class = getattr(transformers, VISION_CLASSES[vision_config.model_type])
    vision_tower = _load(
        vision_class.from_pretrained, vision_ref, "model.vision_tower", dtype=dtype
    )
    llm = _load(AutoModelForCausalLM.from_pretrained, llm_ref, "model.llm", dtype=dtype)
    tokenizer = _load(AutoTokenizer.from_pretrained, llm_ref, "the tokenizer of model.llm")
    base_image_processor = _load(
        AutoImageProcessor.from_pretrained, vision_ref, "the image processor of model.vision_tower"
    )

    grew = _prepare_tokenizer(tokenizer)
    config = llava_config(
        recipe, vision_tower.config, llm.config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    )
    model_class = (
        LlavaNextForConditionalGeneration
        if model_section.layout == "llava_next"
        else LlavaForConditionalGeneration
    )
    with torch.device("meta"):  # the shell only; the parts bring their weights
        model = model_class(config)
    model.model.vision_tower = vision_tower
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    # a fresh connector, with torch's default Linear init as LLaVA's projector
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config).to(
        dtype=dtype
    )
    if model_section.layout == "llava_next":
        hidden = config.text_config.hidden_size
        model.model.image_newline = nn.Parameter(
            torch.randn(hidden, dtype=dtype) / math.sqrt(hidden)
        )
    if grew:
        # llava-hf pads the vocabulary to a multiple of 64 after adding <image>
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    image_processor = _image_processor(
        base_image_processor,
        model_section.layout,
        data.image_aspect_ratio,
        model_section.image_grid_pinpoints,
    )
    processor = _processor(
        tokenizer,
        image_processor,
        model_section.layout,
        vision_config,
        model_section.vision_feature_select_strategy,
        data.template,
    )
    return model, processor


def load_checkpoint(recipe: Recipe, dtype: torch.dtype):
    """An existing HF LLaVA / LLaVA-NeXT (or p-MoD) checkpoint and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import pmod_cli  # noqa: F401 - registers the p-MoD Auto classes

    reference = resolve_name(recipe.model.checkpoint)
    processor = _load(AutoProcessor.from_pretrained, reference, "model.checkpoint")
    model = _load(
        AutoModelForImageTextToText.from_pretrained, reference, "model.checkpoint", dtype=dtype
    )
    layout = "llava_next" if hasattr(model.config, "image_grid_pinpoints") else "llava"
    if (recipe.data.image_aspect_ratio == "anyres") != (layout == "llava_next"):
        raise UserError(
            f"model.checkpoint is a {layout} model: set data.image_aspect_ratio = "
            f"{'anyres' if layout == 'llava_next' else 'pad (or crop)'}"
        )
    if layout == "llava":  # pad / crop as the recipe says, with the checkpoint's own sizes
        processor.image_processor = _image_processor(
            processor.image_processor, layout, recipe.data.image_aspect_ratio, None
        )
    _prepare_tokenizer(processor.tokenizer)
    processor.chat_template = get_template(recipe.data.template).jinja
    return model, processor


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({directory / name for name in weight_map.values()})
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def load_connector(model: nn.Module, directory: str | Path) -> list[str]:
    """Copy the connector weights of a pretrain output (an HF LLaVA directory) into ``model``."""
    from safetensors import safe_open

    directory = Path(resolve_name(str(directory)))
    if not directory.is_dir():
        raise UserError(
            f"model.pretrained_connector {directory} does not exist; run the pretrain stage first "
            "(e.g. pmod pretrain recipes/tiny_pretrain.toml) or point it at a pretrain output_dir"
        )
    files = _weight_files(directory)
    if not files:
        raise UserError(
            f"model.pretrained_connector {directory} holds no model.safetensors; point it at a pretrain output_dir"
        )
    connector = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                # saved names differ from module names across transformers versions
                # ("multi_modal_projector.linear_1.weight" vs "model.multi_modal_projector...")
                if "multi_modal_projector." in key:
                    connector[
                        "model.multi_modal_projector." + key.split("multi_modal_projector.", 1)[1]
                    ] = weights.get_tensor(key)
                elif key.endswith("image_newline"):
                    connector["model.image_newline"] = weights.get_tensor(key)
    own = {name: p for name, p in model.named_parameters() if part_of(name) == "connector"}
    if "model.image_newline" in own and "model.image_newline" not in connector:
        # a LLaVA-NeXT sft from a base-resolution pretrain: the newline token starts fresh
        del own["model.image_newline"]
    missing = sorted(set(own) - set(connector))
    if missing:
        raise UserError(
            f"model.pretrained_connector {directory} lacks {missing[0]}; was it trained for this layout?"
        )
    with torch.no_grad():
        for name, parameter in own.items():
            if connector[name].shape != parameter.shape:
                raise UserError(
                    f"model.pretrained_connector {directory}: {name} is {tuple(connector[name].shape)}, "
                    f"this model needs {tuple(parameter.shape)} (a different vision tower or LLM?)"
                )
            parameter.copy_(connector[name].to(parameter.dtype))
    return sorted(own)


def check_pmod_layers(recipe: Recipe, num_layers: int) -> list[float]:
    """The retention ratios ``[pmod]`` gives a ``num_layers``-layer model, or a UserError (e.g.
    ``ratios`` of the wrong length, ``mod_layers`` out of range). ``mod_layers_from`` (an ARank
    result file) is read here and becomes the recipe's ``mod_layers``, so the resolved recipe
    saved with the checkpoints names the layers themselves."""
    if recipe.pmod.mod_layers_from:
        from ..analysis.arank import load_arank_layers

        layers = load_arank_layers(resolve_name(recipe.pmod.mod_layers_from), num_layers)
        recipe.pmod.config = dataclasses.replace(recipe.pmod.config, mod_layers=layers)
        recipe.pmod.mod_layers_from = ""
    try:
        return recipe.pmod.config.retention_ratios(num_layers)
    except ValueError as err:
        raise UserError(f"[pmod]: {err}") from None


def build_model(recipe: Recipe, stage: str, dtype: torch.dtype = torch.float32):
    """The model (with parts frozen per ``stage``) and processor of a recipe."""
    if recipe.model.checkpoint:
        model, processor = load_checkpoint(recipe, dtype)
    else:
        model, processor = build_from_parts(recipe, dtype)
    if recipe.model.pretrained_connector:
        load_connector(model, recipe.model.pretrained_connector)
    if recipe.pmod.enabled:
        check_pmod_layers(recipe, model.config.text_config.num_hidden_layers)
        model = apply_pmod(model, recipe.pmod.config)
    elif is_pmod_model(model):
        raise UserError(
            "model.checkpoint is a p-MoD model but pmod.enabled = false; start from a dense checkpoint"
        )
    try:
        model.set_attn_implementation(recipe.model.attn_implementation)
    except (ImportError, ValueError) as err:
        raise UserError(
            f"model.attn_implementation = {recipe.model.attn_implementation!r}: {err}"
        ) from None
    model.config.use_cache = False  # no KV cache while training
    set_trainable(model, trained_parts(recipe, stage))
    return model, processor
