"""Recipes: the numbers and names of a training run, in TOML, parsed into typed sections.

    recipe = load_recipe("recipes/llava_1_5.toml", overrides=["train.max_steps=20"])
    recipe = load_recipe("llava_1_5")  # the same recipe, by the name it ships under
    recipe.train.learning_rate, recipe.pmod.config.beta, recipe.data.path

A recipe has five sections, each one dataclass below: ``[model]``, ``[pmod]``, ``[data]``,
``[train]`` and the optional ``[lora]``. ``[pmod]`` holds ``enabled`` plus the fields of ``PMoDConfig`` (the model core's
own dataclass, so every conversion option is a recipe key). An unknown key, a value of the
wrong type or a bad choice is a ``UserError`` naming the key. Overrides are ``section.key=value``
with the value read as a TOML value (``20``, ``0.4``, ``true``, ``"x"``, ``[1, 0.5]``); a value
that is not valid TOML is taken as a string, so ``data.path=my/file.json`` needs no quotes, and a
string key keeps the text as written (``train.output_dir=2024`` is the directory "2024").
docs/recipes.md documents every key.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.templates import CHAT_TEMPLATE, TEMPLATES
from ..errors import UserError
from ..model.config import PMoDConfig
from ..model.families import FAMILIES, get_family
from ..model.methods import MethodError, method_registry, parse_method

CONNECTORS = ("mlp2x_gelu",)
SELECT_STRATEGIES = ("default", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
DEEPSPEED_PRESETS = ("zero2", "zero3")
STAGES = ("pretrain", "sft")
LORA_SAVES = ("merged", "adapter")
# experiment trackers pmod documents; any other name of the HF Trainer's integrations works too
REPORT_TO = ("none", "tensorboard", "wandb")
# the recipes that run by name (`pmod sft tiny`): the repository's recipes/ folder, in the package
# as pmod_cli/recipes (a link to it in a checkout, its files in a wheel)
SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@dataclass
class ModelSection:
    """[model]: the model to train, from an existing checkpoint or from parts.

    Attributes:
        checkpoint: an HF checkpoint of a registered family (dense or p-MoD), path or hub id; ``tiny:base``
            is the embedded tiny default. Excludes ``vision_tower``/``llm``.
        vision_tower: a CLIP / SigLIP vision model (path or hub id), with ``llm`` builds a new model.
        llm: a causal LM (Llama / Vicuna, Qwen2, Mistral), path or hub id; its tokenizer is used.
        layout: the model family (``pmod_cli.model.families``): ``llava`` (one image crop,
            LLaVA-1.5), ``llava_next`` (anyres), ``llava_onevision`` (anyres_max_9, several
            images, video), ``qwen2_5_vl`` or ``qwen3_vl`` (dynamic resolution; from a checkpoint).
        connector: the projector; ``mlp2x_gelu`` (Linear-GELU-Linear) is LLaVA's and HF's.
        vision_feature_layer: which vision layer feeds the projector (-2: the second to last).
        vision_feature_select_strategy: ``default`` drops the CLS token, ``full`` keeps it.
        image_grid_pinpoints: anyres resolutions, ``[[height, width], ...]`` in pixels (LLaVA-NeXT
            needs them; OneVision defaults to transformers' 1x1 to 6x6 crops).
        pretrained_connector: a pretrain-stage output directory whose connector weights to load,
            or LLaVA's stage-1 ``mm_projector.bin`` (the file or its directory).
        preset: a shape preset of ``pmod_cli.model.presets`` used to plan (``--dry-run``) when the
            parts' configs are not on this machine.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
    """

    checkpoint: str = ""
    vision_tower: str = ""
    llm: str = ""
    layout: str = "llava"
    connector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    image_grid_pinpoints: list[list[int]] = field(default_factory=list)
    pretrained_connector: str = ""
    preset: str = ""
    attn_implementation: str = "sdpa"


@dataclass
class PMoDSection:
    """[pmod]: ``enabled`` (false trains the dense baseline), ``mod_layers_from`` (an ARank
    result file of ``pmod arank --save``, whose proposed MoD layers become ``mod_layers`` once
    the model's size is known) and the ``PMoDConfig`` options."""

    enabled: bool = True
    config: PMoDConfig = field(default_factory=PMoDConfig)
    mod_layers_from: str = ""


@dataclass
class DataSection:
    """[data]: the training samples.

    Attributes:
        path: LLaVA JSON or JSONL file (``tiny:shapes/sft_train.json`` for the tiny set); samples
            may name several images (``image``) and videos (``video``).
        image_folder: directory the samples' ``image`` and ``video`` paths are relative to.
        template: conversation template: ``plain`` (pretrain), ``vicuna_v1``, ``chatml`` (Qwen2),
            or ``chat_template``: the checkpoint's own chat template (its processor's, else its
            tokenizer's), the one evaluation prompts with.
        max_length: tokens per sample, image tokens included; text beyond is cut, image tokens never.
        image_aspect_ratio: ``pad`` (to a square, LLaVA-1.5), ``crop`` (centre crop), ``anyres``
            (LLaVA-NeXT; required by and only valid with ``model.layout = "llava_next"``) or
            ``anyres_max_9`` (LLaVA-OneVision's, required by ``model.layout = "llava_onevision"``)
            or ``dynamic`` (Qwen-VL: the processor's own pixel limits).
        video_frames: frames sampled uniformly from each video (every video of a batch has as many).
        max_bad_fraction: stop if more than this fraction of samples is bad (missing image, ...).
        check_images: open every image's header before training (false: only check it exists).
    """

    path: str = ""
    image_folder: str = ""
    template: str = "vicuna_v1"
    max_length: int = 2048
    image_aspect_ratio: str = "pad"
    video_frames: int = 8
    max_bad_fraction: float = 0.01
    check_images: bool = True


@dataclass
class TrainSection:
    """[train]: the optimisation.

    Attributes:
        output_dir: where checkpoints, the final model and summary.json go.
        max_steps: optimizer steps; -1 runs ``num_epochs`` epochs.
        num_epochs: passes over the data when ``max_steps`` is -1.
        global_batch_size: samples per optimizer step = per-device batch x accumulation x
            processes; the accumulation is derived at launch, so the recipe fits any world size.
        per_device_batch_size: samples per process per forward pass.
        learning_rate: learning rate of every trained part without its own rate.
        connector_lr, llm_lr, router_lr, vision_tower_lr: per-part rates (0 = use learning_rate).
        tune_vision_tower: sft also trains the vision tower (the paper freezes it for p-MoD).
        lr_scheduler: ``cosine``, ``linear``, ``constant``, ``constant_with_warmup``.
        warmup_ratio: fraction of the steps spent warming up.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        max_grad_norm: gradient clipping.
        precision: ``auto`` (bf16 on a GPU that has it, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        deepspeed: ``zero2``, ``zero3`` (the shipped configs) or a path to a DeepSpeed JSON; empty: none.
        save_steps: checkpoint every this many steps (and at the end).
        save_total_limit: keep at most this many checkpoints (0 keeps all).
        logging_steps: log the loss every this many steps.
        seed: seeds data order and initialisation.
        dataloader_num_workers: processes loading and encoding samples.
        overwrite_output_dir: start over even if output_dir holds checkpoints of an earlier run.
        report_to: experiment tracking through the HF Trainer's integrations: ``none``,
            ``tensorboard`` (event files under ``output_dir/runs/``), ``wandb`` (offline when
            it cannot reach its server), or a list of them.
        group_by_modality_length: every optimizer step takes samples of one modality (all with an
            image, or all text-only), similar lengths sharing a micro-batch, as LLaVA's trainer does.
        tf32: TF32 matrix products on an Ampere or newer GPU (ignored on the CPU).
        method: the token-reduction method the model trains with when ``pmod.enabled``:
            ``pmod`` (its routers, from ``[pmod]``) or another method with a training mode, in
            ``--method`` spelling (``"pdrop:ratio=0.5"``; the model then has no routers).
    """

    output_dir: str = ""
    max_steps: int = -1
    num_epochs: float = 1.0
    global_batch_size: int = 128
    per_device_batch_size: int = 16
    learning_rate: float = 2e-5
    connector_lr: float = 0.0
    llm_lr: float = 0.0
    router_lr: float = 0.0
    vision_tower_lr: float = 0.0
    tune_vision_tower: bool = False
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    deepspeed: str = ""
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 42
    dataloader_num_workers: int = 0
    overwrite_output_dir: bool = False
    report_to: str | list[str] = "none"
    group_by_modality_length: bool = False
    tf32: bool = False
    method: str = "pmod"


@dataclass
class LoraSection:
    """[lora]: train the language model through LoRA adapters (PEFT) instead of in full.

    The adapters go on the language model's linear layers; the connector and the routers (and
    the vision tower, with ``train.tune_vision_tower``) still train in full: the routers are new,
    and a low-rank update of a layer that is not there cannot train them.

    Attributes:
        enabled: train adapters (sft only); false trains the parts in full, as without [lora].
        r: rank of each adapter.
        alpha: an adapter adds (alpha / r) * B A x to its layer's output.
        dropout: dropout on the adapter's input.
        targets: ``all-linear`` (every linear layer of the language model: q, k, v, o, gate, up,
            down) or a list of layer names, e.g. ``["q_proj", "v_proj"]``. Routers never get one.
        qlora: load the language model's linear layers in 4-bit NF4 (bitsandbytes; CUDA only).
        save: ``merged`` (the final model with the adapters merged in, an ordinary checkpoint) or
            ``adapter`` (the adapter alone, loaded on top of ``model.checkpoint``).
    """

    enabled: bool = False
    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    qlora: bool = False
    save: str = "merged"

    @property
    def target_names(self) -> list[str] | None:
        """The layer names of ``targets``; None for every linear layer."""
        if isinstance(self.targets, str):
            if self.targets == "all-linear":
                return None
            return [name.strip() for name in self.targets.split(",") if name.strip()]
        return list(self.targets)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    pmod: PMoDSection = field(default_factory=PMoDSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    source: str = ""  # the file it came from

    def part_learning_rate(self, part: str) -> float:
        rate = getattr(self.train, f"{part}_lr")
        return rate if rate > 0 else self.train.learning_rate

    def to_dict(self) -> dict[str, dict[str, Any]]:
        pmod = {"enabled": self.pmod.enabled, **self.pmod.config.to_dict()}
        if self.pmod.mod_layers_from:
            pmod["mod_layers_from"] = self.pmod.mod_layers_from
        return {
            "model": dataclasses.asdict(self.model),
            "pmod": pmod,
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "lora": dataclasses.asdict(self.lora),
        }

    def to_toml(self) -> str:
        """The resolved recipe (every key, defaults included) as TOML; ``load_recipe`` reads it back."""
        lines = [f"# resolved recipe{f' from {self.source}' if self.source else ''}"]
        for section, values in self.to_dict().items():
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                if value is None:  # TOML has no null: an absent key means the default
                    continue
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


# ---- parsing ------------------------------------------------------------------------------

_SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "lora": LoraSection,
}


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """``value`` converted to ``hint`` (int -> float is fine), or a UserError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        errors = []
        for option in options:
            try:
                return _check_type(value, option, key)
            except UserError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_check_type(item, item_hint, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f'{key} must be a string, got {value!r} (quote it: "...")')
        return value
    raise TypeError(f"recipe field {key} has an unsupported type {hint!r}")  # a bug, not the user's


def _build_section(cls: type, values: dict[str, Any], section: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(
                f"unknown recipe key {section}.{key}; known keys of [{section}]: {', '.join(known)}"
            )
        kwargs[key] = _check_type(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _build_pmod(values: dict[str, Any]) -> PMoDSection:
    values = dict(values)
    enabled = _check_type(values.pop("enabled", True), bool, "pmod.enabled")
    mod_layers_from = _check_type(values.pop("mod_layers_from", ""), str, "pmod.mod_layers_from")
    hints = typing.get_type_hints(PMoDConfig)
    options = {}
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(["enabled", "mod_layers_from", *hints])
            raise UserError(f"unknown recipe key pmod.{key}; known keys of [pmod]: {known}")
        options[key] = _check_type(value, hints[key], f"pmod.{key}")
    try:
        config = PMoDConfig(**options)
    except ValueError as err:
        raise UserError(f"[pmod]: {err}") from None
    if mod_layers_from and config.mod_layers is not None:
        raise UserError(
            "[pmod]: give mod_layers or mod_layers_from (an ARank result file), not both"
        )
    return PMoDSection(enabled=enabled, config=config, mod_layers_from=mod_layers_from)


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise UserError(f"{key} = {value!r} is not one of {', '.join(choices)}")


def validate(recipe: Recipe) -> Recipe:
    """Cross-field checks that do not need files or models."""
    _check_model_section(recipe.model)
    _check_pmod_section(recipe.pmod.config)
    _check_data_section(recipe.data, recipe.model)
    _check_train_section(recipe.train)
    _check_train_method(recipe)
    _check_report_to(recipe.train.report_to)
    _check_lora(recipe)
    return recipe


def _check_model_section(model) -> None:
    if model.checkpoint and (model.vision_tower or model.llm):
        raise UserError("set either model.checkpoint or model.vision_tower + model.llm, not both")
    if not model.checkpoint and not (model.vision_tower and model.llm):
        raise UserError(
            "the recipe names no model: set model.checkpoint, or model.vision_tower and model.llm"
        )
    _choice(model.layout, tuple(FAMILIES), "model.layout")
    family = FAMILIES[model.layout]
    if not model.checkpoint and not family.builds_from_parts:
        raise UserError(
            f'model.layout = "{model.layout}": {family.title} trains from a whole checkpoint; set '
            "model.checkpoint (and no model.vision_tower / model.llm)"
        )
    _choice(model.connector, CONNECTORS, "model.connector")
    _choice(
        model.vision_feature_select_strategy,
        SELECT_STRATEGIES,
        "model.vision_feature_select_strategy",
    )
    for pinpoint in model.image_grid_pinpoints:
        if len(pinpoint) != 2 or min(pinpoint) <= 0:
            raise UserError(
                f"model.image_grid_pinpoints entries must be [height, width], got {pinpoint}"
            )


def _check_pmod_section(pmod) -> None:
    """What can be checked without the layer count (the rest runs once the model is known)."""
    for ratio in pmod.ratios or ():
        if not 0.0 < ratio <= 1.0:
            raise UserError(f"pmod.ratios values must be in (0, 1], got {ratio}")
    negative = sorted(i for i in pmod.mod_layers or () if i < 0)
    if negative:
        raise UserError(
            f"pmod.mod_layers must be layer indices (0 = the first layer), got {negative}"
        )


def _check_data_section(data, model) -> None:
    if not data.path:
        raise UserError("data.path is not set; name a LLaVA JSON or JSONL file")
    _choice(data.template, (*TEMPLATES, CHAT_TEMPLATE), "data.template")
    aspect_ratios = tuple(
        dict.fromkeys(ratio for family in FAMILIES.values() for ratio in family.aspect_ratios)
    )
    _choice(data.image_aspect_ratio, aspect_ratios, "data.image_aspect_ratio")
    if model.vision_tower:
        check_aspect_ratio(model.layout, data.image_aspect_ratio)
    if data.max_length <= 0:
        raise UserError(f"data.max_length must be positive, got {data.max_length}")
    if data.video_frames <= 0:
        raise UserError(f"data.video_frames must be positive, got {data.video_frames}")
    if not 0.0 <= data.max_bad_fraction <= 1.0:
        raise UserError(f"data.max_bad_fraction must be in [0, 1], got {data.max_bad_fraction}")


def _check_train_section(train) -> None:
    if not train.output_dir:
        raise UserError("train.output_dir is not set")
    if train.max_steps == 0 or train.max_steps < -1:
        raise UserError(
            f"train.max_steps must be positive (or -1 for num_epochs), got {train.max_steps}"
        )
    if train.max_steps == -1 and train.num_epochs <= 0:
        raise UserError(
            f"train.num_epochs must be positive when train.max_steps = -1, got {train.num_epochs}"
        )
    for key in ("global_batch_size", "per_device_batch_size", "save_steps", "logging_steps"):
        if getattr(train, key) <= 0:
            raise UserError(f"train.{key} must be positive, got {getattr(train, key)}")
    if train.global_batch_size % train.per_device_batch_size:
        raise UserError(
            f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
            f"train.per_device_batch_size ({train.per_device_batch_size})"
        )
    for key in (
        "learning_rate",
        "connector_lr",
        "llm_lr",
        "router_lr",
        "vision_tower_lr",
        "weight_decay",
        "num_epochs",
        "save_total_limit",
        "dataloader_num_workers",
    ):
        if getattr(train, key) < 0:
            raise UserError(f"train.{key} must be >= 0, got {getattr(train, key)}")
    _choice(train.lr_scheduler, SCHEDULERS, "train.lr_scheduler")
    _choice(train.precision, PRECISIONS, "train.precision")
    if not 0.0 <= train.warmup_ratio < 1.0:
        raise UserError(f"train.warmup_ratio must be in [0, 1), got {train.warmup_ratio}")
    if (
        train.deepspeed
        and train.deepspeed not in DEEPSPEED_PRESETS
        and not Path(train.deepspeed).is_file()
    ):
        raise UserError(
            f"train.deepspeed = {train.deepspeed!r} is neither {' nor '.join(DEEPSPEED_PRESETS)} nor an existing JSON file"
        )


def _check_train_method(recipe: Recipe) -> None:
    """``train.method``: a method with a training mode, and token reduction switched on."""
    try:
        method = parse_method(recipe.train.method)
    except MethodError as err:
        raise UserError(f"train.method = {recipe.train.method!r}: {err}") from None
    if not method.trains:
        trainable = ", ".join(name for name, cls in method_registry().items() if cls.trains)
        raise UserError(
            f"train.method = {recipe.train.method!r}: {method.name} has no training mode; "
            f"a recipe trains with {trainable}"
        )
    if method.name != "pmod" and not recipe.pmod.enabled:
        raise UserError(
            f"train.method = {recipe.train.method!r} reduces tokens but pmod.enabled = false "
            "trains the dense model: set pmod.enabled = true (or leave train.method out)"
        )


def _check_report_to(report_to: str | list[str]) -> None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else report_to
    known = (*REPORT_TO, *sorted(set(INTEGRATION_TO_CALLBACK) - set(REPORT_TO)))
    for name in names:
        if name not in known:
            raise UserError(
                f"train.report_to = {name!r} is not one of {', '.join(REPORT_TO)} "
                "(or another integration of the HF Trainer)"
            )
    if "none" in names and len(names) > 1:
        raise UserError('train.report_to: "none" cannot be listed with a tracker')


def _check_lora(recipe: Recipe) -> None:
    lora = recipe.lora
    if lora.qlora and not lora.enabled:
        raise UserError("lora.qlora = true trains 4-bit LoRA adapters; set lora.enabled = true too")
    if not lora.enabled:
        return
    if lora.r <= 0 or lora.alpha <= 0:
        raise UserError(f"lora.r and lora.alpha must be positive, got {lora.r} and {lora.alpha:g}")
    if not 0.0 <= lora.dropout < 1.0:
        raise UserError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    if lora.target_names == []:
        raise UserError('lora.targets is empty; use "all-linear" or layer names such as ["q_proj"]')
    _choice(lora.save, LORA_SAVES, "lora.save")
    if lora.save == "adapter" and not recipe.model.checkpoint:
        raise UserError(
            'lora.save = "adapter" keeps the adapter alone, to be loaded on top of model.checkpoint; '
            "a model built from model.vision_tower + model.llm has no checkpoint to load it on: "
            'keep lora.save = "merged"'
        )
    if lora.qlora and recipe.train.deepspeed == "zero3":
        raise UserError(
            "lora.qlora does not work with train.deepspeed = zero3 (4-bit weights cannot be "
            "partitioned); use zero2 or no DeepSpeed"
        )


def check_aspect_ratio(layout: str, aspect_ratio: str) -> None:
    """A UserError unless ``data.image_aspect_ratio`` is one the ``layout`` family trains with."""
    family = get_family(layout)
    if aspect_ratio not in family.aspect_ratios:
        raise UserError(
            f"a {layout} model ({family.title}) takes data.image_aspect_ratio = "
            f"{' or '.join(map(repr, family.aspect_ratios))}, not {aspect_ratio!r}"
        )


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value read as TOML, else as a string)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. train.max_steps=20")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--set {text!r}: the key must be section.key, e.g. train.max_steps")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def _is_string_key(section: str, key: str) -> bool:
    """Whether ``section.key`` is a known string-typed recipe key."""
    if (section, key) == ("pmod", "mod_layers_from"):
        return True
    cls = PMoDConfig if section == "pmod" else _SECTIONS.get(section)
    return cls is not None and typing.get_type_hints(cls).get(key) is str


def recipe_from_dict(values: dict[str, Any], source: str = "") -> Recipe:
    unknown = sorted(set(values) - {"model", "pmod", "data", "train", "lora"})
    if unknown:
        raise UserError(
            f"unknown recipe section [{unknown[0]}]; sections are [model], [pmod], [data], [train], [lora]"
        )
    sections = {}
    for name, cls in _SECTIONS.items():
        section_values = values.get(name, {})
        if not isinstance(section_values, dict):
            raise UserError(f"{name} must be a [{name}] table")
        sections[name] = _build_section(cls, section_values, name)
    pmod_values = values.get("pmod", {})
    if not isinstance(pmod_values, dict):
        raise UserError("pmod must be a [pmod] table")
    return validate(Recipe(pmod=_build_pmod(pmod_values), source=source, **sections))


def shipped_recipes() -> dict[str, Path]:
    """The recipes shipped with pmod, by name (the file name without ``.toml``)."""
    return {path.stem: path for path in sorted(SHIPPED_RECIPES.glob("*.toml"))}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: ``name_or_path`` when it is a file, else the shipped recipe of that name
    (``llava_next`` or ``llava_next.toml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if path.parent == Path(".") and path.name.removesuffix(".toml") in shipped:
        return shipped[path.name.removesuffix(".toml")]
    raise UserError(
        f"recipe {name_or_path} is neither a file nor a recipe shipped with pmod; pass a TOML file "
        f"or one of: {', '.join(shipped)}"
    )


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, type-check and validate a recipe, given as a file or a shipped recipe's name."""
    path = find_recipe(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot parse recipe {path}: {err}") from None
    for override in overrides:
        section, key, value = parse_override(override)
        if _is_string_key(section, key) and not isinstance(value, str | list | dict):
            value = override.split("=", 1)[1].strip()  # train.output_dir=2024 names a directory
        table = values.setdefault(section, {})
        if not isinstance(table, dict):
            raise UserError(f"--set {override!r}: [{section}] is not a table")
        table[key] = value
    return recipe_from_dict(values, source=str(path))
