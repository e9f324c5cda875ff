"""The model-family registry: one entry per kind of multimodal model pmod can convert.

A family says, in one place, everything the commands need to know about a kind of model: its HF
classes and ``model_type``, its p-MoD classes, which language models and vision towers it takes,
which input tokens are vision tokens (image and video tokens) and which image or video frame each
belongs to, how its processor is built and which chat template it uses, how many vision tokens an
image or a video becomes and what its vision tower costs (for FLOPs), its HF config of a shape and
the shape of a config (presets), where each vision token sits on the image or frame (for
``pmod visualize``), its tiny random-init models, and its name in recipes (``model.layout``).
Every command reads it:

    family = family_for_model(model)           # or get_family("llava_next"), family_for_model_type(...)
    family.vision_mask(input_ids, model.config)

Adding a family is one module in this package: a ``ModelFamily`` subclass decorated with
``@register_family`` (see ``llava.py``) and imported from ``__init__.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ...errors import UserError
from .tiny import TinySpec

IMAGE_TOKEN = "<image>"
DEFAULT_TEXT_MODELS = ("llama", "qwen2", "mistral")
DEFAULT_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


class ModelFamily:
    """One kind of multimodal model. Subclasses set the class attributes and the hooks below."""

    name: ClassVar[str]  # registry key; also the recipe's ``model.layout``
    title: ClassVar[str]  # for people: "LLaVA-1.5"
    dense_config_class: ClassVar[type]  # transformers' config class
    dense_model_class: ClassVar[type]  # transformers' model class
    pmod_config_class: ClassVar[type]  # the p-MoD config class (own model_type)
    pmod_model_class: ClassVar[type]  # the p-MoD model class
    processor_class: ClassVar[type]
    text_model_types: ClassVar[tuple[str, ...]] = DEFAULT_TEXT_MODELS
    vision_model_types: ClassVar[tuple[str, ...]] = DEFAULT_VISION_TOWERS
    aspect_ratios: ClassVar[tuple[str, ...]]  # ``data.image_aspect_ratio`` values it trains with
    # parameter names (prefixes) of the connector, the part that pretrain trains
    connector_parameters: ClassVar[tuple[str, ...]] = ("model.multi_modal_projector.",)
    # parameter names (prefixes) of the vision tower (what sft freezes unless told otherwise)
    vision_tower_parameters: ClassVar[tuple[str, ...]] = ("model.vision_tower.",)
    # chat template when a checkpoint saved none: text model_type -> template name (its Jinja:
    # model/chat_templates.py; the training format: data/templates.py)
    default_templates: ClassVar[dict[str, str]] = {"qwen2": "chatml"}
    fallback_template: ClassVar[str] = "vicuna_v1"
    # config attribute -> the placeholder token the processor expands into that kind of vision token
    media_tokens: ClassVar[dict[str, str]] = {"image_token_id": "<image>"}
    # each image is one square grid of vision tokens (the ``pool`` method averages it)
    single_grid_images: ClassVar[bool] = False
    # ``generate`` arguments that ``vision_token_groups`` reads but that generate consumes before
    # the first forward call (Qwen-VL: the grids); the p-MoD model hands them on
    grouping_inputs: ClassVar[tuple[str, ...]] = ()
    # a recipe may join a vision tower and a language model of this family (model.vision_tower + llm)
    builds_from_parts: ClassVar[bool] = True
    # token-reduction methods (model/methods/) the family cannot run: name -> why
    unsupported_methods: ClassVar[dict[str, str]] = {}

    @property
    def dense_model_type(self) -> str:
        return self.dense_config_class.model_type

    @property
    def pmod_model_type(self) -> str:
        return self.pmod_config_class.model_type

    # ---- the model ---------------------------------------------------------------------

    def decoder_layers(self, model) -> torch.nn.ModuleList:
        """The language model's decoder layers, which p-MoD converts."""
        return model.model.language_model.layers

    @property
    def takes_video(self) -> bool:
        return "video_token_id" in self.media_tokens

    def vision_mask(self, input_ids: torch.Tensor, config) -> torch.Tensor:
        """(batch, seq) bool: the positions the model fills with vision features (image or video)."""
        mask = input_ids == config.image_token_id
        for key in self.media_tokens:
            if key != "image_token_id":
                mask = mask | (input_ids == getattr(config, key))
        return mask

    def vision_token_groups(self, config, inputs: dict[str, Any]) -> list[tuple[int, list[int]]]:
        """Per kind of vision token: (its token id, the number of tokens of each image or video
        frame of the batch, in the order the model fills them), from the forward call's inputs:
        the features ``generate`` encoded ahead (``encoded_token_counts``), else the pixel inputs
        (``pixel_values``, ``image_sizes``, ...). The per-image budget (``PMoDConfig.budget``) uses it."""
        raise NotImplementedError(f"{self.title} does not group its vision tokens by image")

    def vision_groups(
        self, input_ids: torch.Tensor, config, inputs: dict[str, Any]
    ) -> torch.Tensor:
        """(batch, seq) long: the image or video frame each vision token belongs to, -1 elsewhere.

        The counts come from the model's own inputs, not from runs of vision tokens: two images
        whose token runs touch are still two groups. Group ids are unique within the batch.
        """
        groups = torch.full_like(input_ids, -1)
        next_id = 0
        for token_id, sizes in self.vision_token_groups(config, inputs):
            positions = input_ids == token_id
            if int(positions.sum()) != sum(sizes):
                raise ValueError(
                    f"{int(positions.sum())} tokens {token_id} in the input, but its images / frames "
                    f"make {sum(sizes)}; pass the processor's outputs unchanged"
                )
            ids = torch.arange(next_id, next_id + len(sizes), device=input_ids.device)
            # boolean-mask assignment fills row by row, left to right: the order the model fills features
            groups[positions] = torch.repeat_interleave(
                ids, torch.tensor(sizes, dtype=torch.long, device=input_ids.device)
            )
            next_id += len(sizes)
        return groups

    def media_placeholder(self, processor, kind: str) -> str:
        """What a prompt holds for one image (``kind="image"``) or video: the processor's token
        (Qwen-VL: wrapped in its vision markers)."""
        return getattr(processor, f"{kind}_token", None) or f"<{kind}>"

    def media_expansion(self, processor, kind: str, count: int, own: str | None = None) -> str:
        """The text of one image / video of ``count`` vision tokens, as the processor expands it
        (``own``: the processor's own text for its token, when it writes more than the tokens)."""
        return own or getattr(processor, f"{kind}_token") * count

    def set_video_frames(self, video_processor, frames: int) -> None:
        """Tell a video processor that pmod hands it ``frames`` frames per video, spread over the
        video (``data/video.py``): saved with the model, evaluation decodes as many."""
        video_processor.num_frames = frames

    def video_texts(self, processor, videos) -> list[str] | None:
        """The processor's text for each video's token, when it writes text between a video's
        vision tokens (Qwen3-VL: timestamps); None when a video is its tokens alone."""
        return None

    def token_types(self, processor) -> dict[int, int] | None:
        """Token id -> the ``mm_token_type_ids`` value the model needs (None: takes none), for
        batches the processor did not make (training)."""
        return None

    def check_text_model(self, text_model_type: str) -> None:
        if text_model_type not in self.text_model_types:
            raise UnsupportedModelError(
                f"p-MoD supports {', '.join(self.text_model_types)} language models in {self.title}, "
                f"not {text_model_type!r}"
            )

    def template_name(self, text_model_type: str) -> str:
        """The conversation template a checkpoint of this family uses when it saved none."""
        return self.default_templates.get(text_model_type, self.fallback_template)

    # ---- building (training from parts, tiny models, shape presets) ----------------------

    def config_options(self, image_grid_pinpoints: list[list[int]] | None) -> dict[str, Any]:
        """Family-specific keyword arguments of ``dense_config_class`` beyond the common ones."""
        return {}

    def image_processor(self, settings: dict[str, Any], aspect_ratio: str, grid_pinpoints) -> Any:
        """The family's image processor from a vision tower's size/crop/mean/std ``settings``."""
        raise NotImplementedError

    def adapt_image_processor(self, image_processor, aspect_ratio: str) -> Any:
        """A checkpoint's image processor set to a recipe's ``data.image_aspect_ratio``."""
        return image_processor

    def init_new_connector(self, model, dtype: torch.dtype) -> None:
        """Initialise what a fresh connector has besides the projector (LLaVA-NeXT: the newline)."""

    def build_processor(
        self, tokenizer, image_processor, vision_config, select_strategy: str, chat_template: str
    ):
        """The family's processor joining a tokenizer and an image processor (training from parts)."""
        return self.processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vision_config.patch_size,
            vision_feature_select_strategy=select_strategy,
            # CLIP puts a CLS token in front of the patches; SigLIP has none
            num_additional_image_tokens=1 if vision_config.model_type.startswith("clip") else 0,
            image_token=self.media_tokens["image_token_id"],
            chat_template=chat_template,
        )

    # ---- shapes (presets, FLOPs) and tiny models --------------------------------------------

    def hf_config(self, shape, pmod=None):
        """The transformers config of a ``shapes.ModelShape`` of this family (with ``pmod``: of
        its p-MoD config class)."""
        raise NotImplementedError

    def shape_from_config(self, config, directory=None):
        """The ``shapes.ModelShape`` of a transformers config of this family (``directory``: the
        checkpoint it was read from, for what the config does not hold)."""
        raise NotImplementedError

    def vision_encoder_flops(self, shape, vision_tokens: int, crops: int) -> dict[str, int]:
        """FLOPs of the vision tower and the connector for ``crops`` crops (or video frames) that
        become ``vision_tokens`` tokens."""
        raise NotImplementedError

    def tiny(self, tokenizer, spec: TinySpec):
        """A random-init tiny model of this family (eval mode) and its processor, from the
        numbers of ``spec`` and a tokenizer that holds the family's media tokens."""
        model = self.tiny_model(spec, len(tokenizer), self.tiny_token_ids(tokenizer, spec))
        return model, self.tiny_processor(tokenizer, model.config, spec)

    def tiny_token_ids(self, tokenizer, spec: TinySpec) -> dict[str, int | None]:
        """The token ids a tiny model's config takes from its tokenizer: the media tokens', the
        pad token's and, with ``spec.generation_ids``, bos and eos."""
        ids: dict[str, int | None] = {
            key: tokenizer.convert_tokens_to_ids(token) for key, token in self.media_tokens.items()
        }
        ids["pad_token_id"] = tokenizer.pad_token_id
        if spec.generation_ids:
            ids.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        return ids

    def tiny_model(self, spec: TinySpec, vocab_size: int, token_ids: dict[str, int | None]):
        """A random-init model of ``spec`` (seeded with ``spec.seed``, eval mode); ``token_ids``:
        the config's (``image_token_id``, ...) and its language model's (``pad_token_id``, ...)."""
        raise NotImplementedError

    def tiny_processor(self, tokenizer, config, spec: TinySpec):
        """The processor of a tiny model of ``spec`` whose config is ``config``."""
        raise NotImplementedError

    # ---- counting and drawing ------------------------------------------------------------

    def image_tokens(self, shape) -> tuple[int, int]:
        """(vision tokens, vision-tower crops) of one image at the family's largest layout."""
        raise NotImplementedError

    def video_tokens(self, shape, frames: int) -> tuple[int, int]:
        """(vision tokens, vision-tower crops) of a video of ``frames`` sampled frames."""
        raise UserError(f"{self.title} takes no video; count images (--vision-tokens) instead")

    def patch_boxes(self, processor, config, image_height: int, image_width: int) -> list:
        """One ``PatchBox`` (or None: no place on the image) per vision token of an image."""
        raise NotImplementedError

    def several_image_boxes(self, processor, config, image_height: int, image_width: int) -> list:
        """The same for an image that shares its prompt with others (most families: as alone)."""
        return self.patch_boxes(processor, config, image_height, image_width)

    def frame_boxes(
        self, processor, config, frame_height: int, frame_width: int, frames: int = 1
    ) -> list:
        """One ``PatchBox`` per vision token of one video frame, or of one step of
        ``frames_per_step`` frames, of a video of ``frames`` frames (a video's other tokens:
        ``video_extra_tokens``)."""
        raise UserError(f"{self.title} takes no video")

    def frames_per_step(self, processor) -> int:
        """Video frames that share one set of vision tokens (Qwen-VL: a temporal patch)."""
        return 1

    video_extra_tokens: ClassVar[int] = (
        0  # vision tokens after a video's last frame (OneVision: a newline)
    )


def encoded_token_counts(inputs: dict[str, Any], modality: str) -> list[int] | None:
    """Tokens of each image (``modality="image"``) or video of a forward call whose vision features
    were encoded ahead (``generate`` passes ``mm_encoder_outputs``); None when they were not."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get(modality)
    if encoded is None:
        return None
    return [
        len(features) for features in encoded.pooler_output
    ]  # (items, tokens, dim) or a list of (tokens, dim)


def features_per_crop(config) -> int:
    """Features one crop hands to the projector: the tower's patches (+ CLIP's CLS), minus the
    first token under ``vision_feature_select_strategy = "default"``."""
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + int(
        vision.model_type.startswith("clip")
    )
    return tokens - int(config.vision_feature_select_strategy == "default")


def prepare_tokenizer(tokenizer, media_tokens: Iterable[str] = (IMAGE_TOKEN,)) -> bool:
    """Give a language model's tokenizer the family's vision placeholder tokens (``<image>``, and
    ``<video>`` for a family that takes video) and a pad token; True if the vocabulary grew."""
    grew = False
    vocab = tokenizer.get_vocab()
    missing = [token for token in media_tokens if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        grew = True
    if tokenizer.pad_token is None:
        # Vicuna has no pad token; LLaVA pads with <unk>
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            grew = True
    return grew


def image_settings(image_processor) -> dict[str, Any]:
    """Size, crop, mean, std and resampling of an image processor (a vision tower's own, or a
    checkpoint's), as keyword arguments for a family's image processor."""
    settings = dict(
        size=dict(image_processor.size),
        crop_size=dict(image_processor.crop_size)
        if getattr(image_processor, "crop_size", None)
        else None,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        resample=image_processor.resample,
    )
    if (
        "height" in settings["size"] and settings["crop_size"] is None
    ):  # SigLIP: a fixed square size
        settings["crop_size"] = dict(settings["size"])
        settings["size"] = {"shortest_edge": settings["size"]["height"]}
    return settings


FAMILIES: dict[str, ModelFamily] = {}


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    family = cls()
    FAMILIES[cls.name] = family
    cls.pmod_model_class.pmod_family = family
    return cls


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def known_model_types(pmod: bool | None = None) -> tuple[str, ...]:
    """Every ``model_type`` pmod reads: dense ones, p-MoD ones (``pmod=True``/``False``), or both."""
    dense = tuple(family.dense_model_type for family in FAMILIES.values())
    converted = tuple(family.pmod_model_type for family in FAMILIES.values())
    return {None: dense + converted, False: dense, True: converted}[pmod]


def family_for_model_type(model_type: str | None) -> ModelFamily:
    """The family of a config.json ``model_type`` (dense or p-MoD); a UserError if none."""
    for family in FAMILIES.values():
        if model_type in (family.dense_model_type, family.pmod_model_type):
            return family
    raise UserError(
        f"pmod does not know {model_type!r} models; it reads {', '.join(known_model_types())}"
    )


class UnsupportedModelError(UserError, TypeError):
    """The model is of no registered family, or its language model is not one the family takes."""


def family_for_model(model) -> ModelFamily:
    """The family of a loaded model, dense or p-MoD; an UnsupportedModelError for any other."""
    for family in FAMILIES.values():
        if type(model) in (family.dense_model_class, family.pmod_model_class):
            return family
    for family in FAMILIES.values():  # a user's subclass of a supported class
        if isinstance(model, family.dense_model_class | family.pmod_model_class):
            return family
    classes = ", ".join(family.dense_model_class.__name__ for family in FAMILIES.values())
    raise UnsupportedModelError(f"pmod supports {classes}, not {type(model).__name__}")


def template_for_model(model) -> str:
    """The conversation template a loaded model answers in when its checkpoint saved none."""
    return family_for_model(model).template_name(model.config.text_config.model_type)


def family_for_processor(processor) -> ModelFamily | None:
    """The family whose processor class ``processor`` is (None for another processor)."""
    for family in FAMILIES.values():
        if type(processor) is family.processor_class:
            return family
    return None


def family_for_config(config) -> ModelFamily:
    """The family of a transformers config object (dense or p-MoD)."""
    return family_for_model_type(getattr(config, "model_type", None))
