"""The model and processor a recipe describes, ready for a stage.

    model, processor = build_model(recipe, stage="sft", dtype=torch.float32)

From parts (``model.vision_tower`` + ``model.llm``): the vision tower and the language model
are loaded with their weights, the tokenizer gets the family's vision tokens (``<image>``, and
OneVision's ``<video>``; a pad token if it has none), and a new mlp2x_gelu connector joins them in
the HF model class of the recipe's model family (``model.layout``: ``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``).
From a checkpoint (``model.checkpoint``): a directory or hub id of any registered family, dense or
p-MoD, loaded by the one checkpoint loader (``pmod_cli.model.loading``). Then ``model.pretrained_connector``
loads a pretrain stage's connector (or LLaVA's stage-1 ``mm_projector.bin``), and ``apply_pmod`` converts the model unless
``pmod.enabled`` is false.

The parameters fall into four parts, the unit of freezing and of learning rates:
``vision_tower``, ``connector`` (projector, and the anyres families' image newline), ``llm``
(decoder, embeddings, lm_head) and ``router`` (the p-MoD routers). With ``[lora]`` the model is
wrapped by PEFT last (``lora.py``): the ``llm`` part then trains through its adapters only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..analysis.arank import load_arank_layers
from ..data.templates import CHAT_TEMPLATE, get_template
from ..data.tiny import resolve_name
from ..errors import UserError
from ..model import PMoDConfig, apply_method, apply_pmod, is_pmod_model, loading
from ..model.families import (
    FAMILIES,
    family_for_config,
    family_for_model,
    get_family,
    image_settings,
)
from ..model.families import prepare_tokenizer as add_image_and_pad_tokens
from ..model.formats.original_llava import hf_weight_name
from ..model.methods import MethodError, parse_method
from ..model.weights import check_weight_files, read_file, weight_files
from .lora import PEFT_PREFIX, add_lora, check_stage, is_lora_model, quantization_config
from .recipe import Recipe, check_aspect_ratio

PARTS = ("vision_tower", "connector", "llm", "router")
# vision config model_type -> the HF class holding only the tower
VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}


def part_of(parameter_name: str) -> str:
    """Which part a parameter of a (p-MoD) model of any registered family belongs to (PEFT's
    names too: a LoRA adapter belongs to the part of the layer it adapts)."""
    parameter_name = parameter_name.removeprefix(PEFT_PREFIX)
    if ".router." in parameter_name or ".pmod_shared_router." in parameter_name:
        return "router"
    # the connector first: Qwen-VL's merger sits inside its vision tower (model.visual.merger)
    if parameter_name.startswith(_CONNECTOR_PARAMETERS):
        return "connector"
    if parameter_name.startswith(_VISION_TOWER_PARAMETERS):
        return "vision_tower"
    return "llm"


_CONNECTOR_PARAMETERS = tuple(
    sorted({name for family in FAMILIES.values() for name in family.connector_parameters})
)
_VISION_TOWER_PARAMETERS = tuple(
    sorted({name for family in FAMILIES.values() for name in family.vision_tower_parameters})
)


def trained_parts(recipe: Recipe, stage: str) -> tuple[str, ...]:
    """Pretrain trains the connector; sft the connector, LLM and routers (and maybe the tower)."""
    if stage == "pretrain":
        return ("connector",)
    parts = ("connector", "llm", "router")
    return (*parts, "vision_tower") if recipe.train.tune_vision_tower else parts


def set_trainable(model: nn.Module, parts: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Freeze everything outside ``parts`` (and, with LoRA, the language model's own weights:
    its adapters train); returns {part: (trainable, total) parameter counts}."""
    lora = is_lora_model(model)
    counts = {part: [0, 0] for part in PARTS}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        trained = part in parts and not (lora and part == "llm" and ".lora_" not in name)
        parameter.requires_grad_(trained)
        counts[part][1] += parameter.numel()
        counts[part][0] += parameter.numel() if trained else 0
    return {part: (trainable, total) for part, (trainable, total) in counts.items()}


# ---- processor ----------------------------------------------------------------------------


def image_processor(base, layout: str, aspect_ratio: str, grid_pinpoints: list[list[int]] | None):
    """The family's image processing from a vision tower's own settings (size, crop, mean, std)."""
    return get_family(layout).image_processor(image_settings(base), aspect_ratio, grid_pinpoints)


def prepare_tokenizer(tokenizer, layout: str = "llava") -> bool:
    """The family tokenizer preparation (its vision tokens, a pad token), right padding for training."""
    grew = add_image_and_pad_tokens(tokenizer, get_family(layout).media_tokens.values())
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


def media_token_ids(tokenizer, layout: str) -> dict[str, int]:
    """The family's vision-token config keys and their ids (``image_token_id``, ``video_token_id``)."""
    return {
        key: tokenizer.convert_tokens_to_ids(token)
        for key, token in get_family(layout).media_tokens.items()
    }


def llava_config(recipe: Recipe, vision_config, text_config, token_ids: dict[str, int]):
    """The HF config of the recipe's model family joining a vision tower and a language model."""
    model = recipe.model
    family = get_family(model.layout)
    features = (vision_config.image_size // vision_config.patch_size) ** 2
    return family.dense_config_class(
        vision_config=vision_config,
        text_config=text_config,
        **token_ids,
        vision_feature_layer=model.vision_feature_layer,
        vision_feature_select_strategy=model.vision_feature_select_strategy,
        projector_hidden_act="gelu",  # mlp2x_gelu: Linear, GELU, Linear
        image_seq_length=features,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
        **family.config_options(model.image_grid_pinpoints),
    )


def _load(loader, reference: str, what: str, **kwargs):
    try:
        return loader(reference, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load {what} {reference!r}: {str(err).splitlines()[0]}") from None


def processor_from_parts(recipe: Recipe, local_only: bool = False):
    """(processor, whether the tokenizer's vocabulary grew) for a model built from parts: the
    LLM's tokenizer with an ``<image>`` token, the family's image processing from the tower's."""
    from transformers import AutoImageProcessor, AutoTokenizer

    model_section, data = recipe.model, recipe.data
    vision_ref, llm_ref = resolve_name(model_section.vision_tower), resolve_name(model_section.llm)
    vision_config = _load(_vision_config, vision_ref, "model.vision_tower", local_only=local_only)
    tokenizer = _load(
        AutoTokenizer.from_pretrained,
        llm_ref,
        "the tokenizer of model.llm",
        local_files_only=local_only,
    )
    base_image_processor = _load(
        AutoImageProcessor.from_pretrained,
        vision_ref,
        "the image processor of model.vision_tower",
        local_files_only=local_only,
    )
    grew = prepare_tokenizer(tokenizer, model_section.layout)
    images = image_processor(
        base_image_processor,
        model_section.layout,
        data.image_aspect_ratio,
        model_section.image_grid_pinpoints,
    )
    processor = get_family(model_section.layout).build_processor(
        tokenizer,
        images,
        vision_config,
        model_section.vision_feature_select_strategy,
        _parts_chat_template(tokenizer, data.template),
    )
    return processor, grew


def _parts_chat_template(tokenizer, template: str) -> str | None:
    """The processor's chat template: the named conversation template's, or none for
    ``"chat_template"`` (prompts then use the language model's own, its tokenizer's)."""
    if template != CHAT_TEMPLATE:
        return get_template(template).jinja
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            'data.template = "chat_template" but model.llm\'s tokenizer has no chat template; name a template'
        )
    return None


def build_from_parts(recipe: Recipe, dtype: torch.dtype, quantization=None):
    """A new model of the recipe's family: loaded vision tower + loaded LLM + a fresh connector
    (``quantization``: a bitsandbytes config the LLM loads with, on this process's GPU)."""
    import transformers
    from transformers import AutoModelForCausalLM

    model_section = recipe.model
    family = get_family(model_section.layout)
    vision_ref, llm_ref = resolve_name(model_section.vision_tower), resolve_name(model_section.llm)
    vision_config = _load(_vision_config, vision_ref, "model.vision_tower")
    vision_class = getattr(transformers, VISION_CLASSES[vision_config.model_type])
    vision_tower = _load(
        vision_class.from_pretrained, vision_ref, "model.vision_tower", dtype=dtype
    )
    quantized = (
        {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}
        if quantization is not None
        else {}
    )
    llm = _load(
        AutoModelForCausalLM.from_pretrained, llm_ref, "model.llm", dtype=dtype, **quantized
    )
    processor, grew = processor_from_parts(recipe)
    tokenizer = processor.tokenizer
    config = llava_config(
        recipe, vision_tower.config, llm.config, media_token_ids(tokenizer, model_section.layout)
    )
    with torch.device("meta"):  # the shell only; the parts bring their weights
        model = family.dense_model_class(config)
    model.model.vision_tower = vision_tower
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    # a fresh connector, with torch's default Linear init as LLaVA's projector
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config).to(
        dtype=dtype
    )
    family.init_new_connector(model, dtype)
    if grew:
        # llava-hf pads the vocabulary to a multiple of 64 after adding <image>
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return model, processor


def checkpoint_processor(recipe: Recipe, config, local_only: bool = False):
    """The processor of ``model.checkpoint`` (whose HF ``config`` is given), set up for the recipe."""
    from transformers import AutoProcessor

    reference = resolve_name(recipe.model.checkpoint)
    processor = _load(
        AutoProcessor.from_pretrained, reference, "model.checkpoint", local_files_only=local_only
    )
    return _for_recipe(processor, family_for_config(config), recipe)


def _for_recipe(processor, family, recipe: Recipe):
    """A checkpoint's processor with the recipe's aspect-ratio mode, template and special tokens."""
    try:
        check_aspect_ratio(family.name, recipe.data.image_aspect_ratio)
    except UserError as err:
        raise UserError(f"model.checkpoint: {err}") from None
    processor.image_processor = family.adapt_image_processor(
        processor.image_processor, recipe.data.image_aspect_ratio
    )
    prepare_tokenizer(processor.tokenizer, family.name)
    if recipe.data.template != CHAT_TEMPLATE:  # else the checkpoint's own chat template stays
        processor.chat_template = get_template(recipe.data.template).jinja
    elif not (processor.chat_template or getattr(processor.tokenizer, "chat_template", None)):
        raise UserError(
            'data.template = "chat_template" but model.checkpoint has no chat template; name a template'
        )
    return processor


def load_checkpoint(recipe: Recipe, dtype: torch.dtype, quantization=None):
    """An existing checkpoint of any registered family (dense or p-MoD) and its processor, set up
    for the recipe's data (aspect-ratio mode, template, <image> and pad tokens)."""
    model, processor = loading.load_checkpoint(
        resolve_name(recipe.model.checkpoint),
        device="cpu",
        dtype=dtype,
        quantization_config=quantization,
    )
    return model, _for_recipe(processor, family_for_model(model), recipe)


def load_connector(model: nn.Module, source: str | Path) -> list[str]:
    """Copy pretrained connector weights into ``model``: a pretrain output (an HF LLaVA
    directory) or LLaVA's stage-1 ``mm_projector.bin`` (the file or its directory)."""
    source = Path(resolve_name(str(source)))
    if not source.exists():
        raise UserError(
            f"model.pretrained_connector {source} does not exist; run the pretrain stage first "
            "(e.g. pmod pretrain recipes/tiny_pretrain.toml) or point it at a pretrain output_dir or a mm_projector.bin"
        )
    projector_file = source if source.is_file() else source / "mm_projector.bin"
    if projector_file.is_file():
        connector = _llava_projector(projector_file)
    else:
        connector = _pretrained_connector(source)
    own = {name: p for name, p in model.named_parameters() if part_of(name) == "connector"}
    if "model.image_newline" in own and "model.image_newline" not in connector:
        # a LLaVA-NeXT sft from a base-resolution pretrain: the newline token starts fresh
        del own["model.image_newline"]
    missing = sorted(set(own) - set(connector))
    if missing:
        raise UserError(
            f"model.pretrained_connector {source} lacks {missing[0]}; was it trained for this layout?"
        )
    with torch.no_grad():
        for name, parameter in own.items():
            if connector[name].shape != parameter.shape:
                raise UserError(
                    f"model.pretrained_connector {source}: {name} is {tuple(connector[name].shape)}, "
                    f"this model needs {tuple(parameter.shape)} (a different vision tower or LLM?)"
                )
            parameter.copy_(connector[name].to(parameter.dtype))
    return sorted(own)


def _pretrained_connector(directory: Path) -> dict[str, torch.Tensor]:
    """The connector of a pretrain output directory, under the model's parameter names."""
    from safetensors import safe_open

    files = [file for file in weight_files(directory) if file.suffix == ".safetensors"]
    if not files:
        raise UserError(
            f"model.pretrained_connector {directory} holds no model.safetensors or mm_projector.bin; "
            "point it at a pretrain output_dir"
        )
    check_weight_files(directory)
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
    return connector


def _llava_projector(file: Path) -> dict[str, torch.Tensor]:
    """LLaVA's ``mm_projector.bin`` (``model.mm_projector.{0,2}.*``, mlp2x_gelu) under llava-hf's names."""
    tensors = read_file(file)  # torch.load(weights_only=True): tensors only
    projector = {
        name: tensor for name, tensor in tensors.items() if name.startswith("model.mm_projector.")
    }
    if not projector:
        raise UserError(f"model.pretrained_connector {file} holds no model.mm_projector.* weights")
    return {hf_weight_name(name): tensor for name, tensor in projector.items()}


def check_pmod_layers(recipe: Recipe, num_layers: int) -> list[float]:
    """The retention ratios ``[pmod]`` gives a ``num_layers``-layer model, or a UserError (e.g.
    ``ratios`` of the wrong length, ``mod_layers`` out of range). ``mod_layers_from`` (an ARank
    result file) is read here and becomes the recipe's ``mod_layers``, so the resolved recipe
    saved with the checkpoints names the layers themselves."""
    if recipe.pmod.mod_layers_from:
        layers = load_arank_layers(resolve_name(recipe.pmod.mod_layers_from), num_layers)
        recipe.pmod.config = dataclasses.replace(recipe.pmod.config, mod_layers=layers)
        recipe.pmod.mod_layers_from = ""
    try:
        return recipe.pmod.config.retention_ratios(num_layers)
    except ValueError as err:
        raise UserError(f"[pmod]: {err}") from None


def apply_training_method(model, recipe: Recipe):
    """p-MoD from ``[pmod]`` (``train.method = "pmod"``), or another method with a training mode
    (``pdrop``) on a model with no routers: every layer's ratio is 1 and the method says what
    each layer keeps."""
    num_layers = model.config.text_config.num_hidden_layers
    method = parse_method(recipe.train.method)
    if method.needs_router:
        check_pmod_layers(recipe, num_layers)
        return apply_pmod(model, recipe.pmod.config)
    try:
        return apply_method(model, method, pmod=PMoDConfig(ratios=[1.0] * num_layers))
    except MethodError as err:
        raise UserError(f"train.method = {recipe.train.method!r}: {err}") from None


def build_model(recipe: Recipe, stage: str, dtype: torch.dtype = torch.float32):
    """The model (with parts frozen per ``stage``; with ``[lora]`` wrapped by PEFT) and
    processor of a recipe."""
    check_stage(recipe, stage)
    lora = recipe.lora if recipe.lora.enabled else None
    quantization = quantization_config() if lora is not None and lora.qlora else None
    if recipe.model.checkpoint:
        model, processor = load_checkpoint(recipe, dtype, quantization)
    else:
        model, processor = build_from_parts(recipe, dtype, quantization)
    if recipe.model.pretrained_connector:
        load_connector(model, recipe.model.pretrained_connector)
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is not None:  # saved with the model: evaluation samples as many frames
        family_for_model(model).set_video_frames(video_processor, recipe.data.video_frames)
    if recipe.pmod.enabled:
        model = apply_training_method(model, recipe)
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
    if lora is not None:
        model = add_lora(model, lora, recipe.train.gradient_checkpointing)
    set_trainable(model, trained_parts(recipe, stage))
    return model, processor
