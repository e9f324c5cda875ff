"""``--dry-run``: check a recipe and its data, and show what a run would do; train nothing.

The model is built on the ``meta`` device from its config (the parts' or checkpoint's config
when it is on this machine, else the shape preset ``model.preset``), so a 7B plan needs no
download and no memory. The plan lists the parameters per part and which train, the p-MoD
schedule with the TFLOPs and KV cache of ``pmod flops`` (same code), the derived batch
arithmetic and the data check: every sample's structure, every image decoded in full and,
when the tokenizer and image processor are on this machine, every sample encoded as training
encodes it (so an answer past ``data.max_length`` counts as bad, as in training).

Whatever would make a real run stop (bad data over ``data.max_bad_fraction``, a missing
pretrained connector, an output directory in use or holding another run, a ``--resume`` the
checkpoint refuses) is listed; ``dry_run`` then ends in a ``UserError`` (exit code 2).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..data.llava_data import SampleEncoder, find_load_failures, load_records, scan_records
from ..data.templates import CHAT_TEMPLATE, get_template
from ..efficiency.flops import FlopsCount, count_flops
from ..efficiency.plan import FlopsPlan, PlanEntry
from ..efficiency.report import layer_table, summary_table
from ..errors import UserError
from ..model import apply_pmod
from ..model.presets import ModelShape, get_preset, shape_from_hf_config
from .build import (
    PARTS,
    check_pmod_layers,
    checkpoint_processor,
    llava_config,
    media_token_ids,
    prepare_tokenizer,
    processor_from_parts,
    resolve_name,
    set_trainable,
    trained_parts,
)
from .lora import adapted_layers, add_lora, check_stage, describe, unwrap_lora
from .paths import check_output_dir, data_paths
from .recipe import Recipe
from .resume import check_not_finished, check_same_run
from .run_lock import RunLock
from .tracking import check_trackers


@dataclass
class DataCheck:
    path: str
    found: bool
    total: int = 0
    usable: int = 0
    text_only: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    failing_at_load: int = 0  # of ``bad``: pass the header check, fail when loaded in full
    encoded: bool = False  # samples were encoded (tokenizer on this machine), not only decoded
    problem: str = ""


@dataclass
class TrainingPlan:
    stage: str
    model_source: str  # where the config came from
    parameters: dict[str, tuple[int, int]]  # part -> (trainable, total)
    learning_rates: dict[str, float]
    flops: FlopsCount
    shape: ModelShape
    world_size: int
    accumulation: int
    data: DataCheck
    pmod_enabled: bool
    blockers: list[str] = field(default_factory=list)  # why a real run would stop
    lora: str = ""  # the adapters, in one line; empty without [lora]

    @property
    def trainable_parameters(self) -> int:
        return sum(trainable for trainable, _ in self.parameters.values())

    @property
    def retention_ratios(self) -> list[float]:
        return list(self.flops.retention_ratios)


def _local_config(reference: str):
    """The transformers config of ``reference`` if it is on this machine, else None."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_name(reference), local_files_only=True)
    except (OSError, ValueError):
        return None


def _config_from_preset(recipe: Recipe):
    if not recipe.model.preset:
        return None
    config = get_preset(recipe.model.preset).to_hf_config()
    # the recipe's choices win over the preset's
    config.vision_feature_layer = recipe.model.vision_feature_layer
    config.vision_feature_select_strategy = recipe.model.vision_feature_select_strategy
    if hasattr(config, "image_grid_pinpoints") and recipe.model.image_grid_pinpoints:
        config.image_grid_pinpoints = recipe.model.image_grid_pinpoints
    return config


def model_config(recipe: Recipe):
    """(HF LLaVA config, where it came from), without loading weights."""
    model = recipe.model
    if model.checkpoint:
        config = _local_config(model.checkpoint)
        if config is not None:
            return config, f"checkpoint {model.checkpoint}"
    else:
        vision, text = _local_config(model.vision_tower), _local_config(model.llm)
        if vision is not None and text is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                resolve_name(model.llm), local_files_only=True
            )
            prepare_tokenizer(tokenizer, model.layout)
            vision = getattr(vision, "vision_config", None) or vision
            config = llava_config(recipe, vision, text, media_token_ids(tokenizer, model.layout))
            if len(tokenizer) > config.text_config.vocab_size:
                config.text_config.vocab_size = -(-len(tokenizer) // 64) * 64
            return config, f"parts {model.vision_tower} + {model.llm}"
    config = _config_from_preset(recipe)
    if config is not None:
        return config, f"preset {recipe.model.preset} (the weights are not on this machine)"
    what = model.checkpoint or f"{model.vision_tower} / {model.llm}"
    raise UserError(
        f"cannot plan: the config of {what} is not on this machine; set model.preset "
        "(e.g. llava-1.5-7b) to plan from its shape"
    )


def _meta_model(config, pmod_enabled: bool, recipe: Recipe):
    from transformers import AutoModelForImageTextToText

    if pmod_enabled:  # before building: a wrong [pmod] is a one-line error, not a traceback
        check_pmod_layers(recipe, config.text_config.num_hidden_layers)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    if pmod_enabled:
        model = apply_pmod(model, recipe.pmod.config)
    return model


def check_data(recipe: Recipe, processor=None) -> DataCheck:
    """Every sample checked as a real run checks it, up front and while loading (``processor``:
    encode each sample too; without it images are decoded but lengths are not checked)."""
    data_path, image_folder = data_paths(recipe)
    check = DataCheck(path=str(data_path), found=data_path.is_file())
    if not check.found:
        check.problem = f"{data_path} not found (set data.path)"
        return check
    if recipe.data.image_folder and not image_folder.is_dir():
        check.problem = f"data.image_folder {image_folder} is not a directory"
        return check
    records = load_records(data_path)
    # every sample is checked; too many bad ones is reported, not raised, in a plan
    scan = scan_records(
        records, image_folder, max_bad_fraction=1.0, open_images=recipe.data.check_images
    )
    encoder = None
    if processor is not None:
        template = recipe.data.template
        encoder = SampleEncoder(
            processor,
            template if template == CHAT_TEMPLATE else get_template(template),
            recipe.data.max_length,
        )
    failures = find_load_failures(
        records, scan.valid, image_folder, encoder, video_frames=recipe.data.video_frames
    )
    check.total, check.text_only, check.encoded = scan.total, scan.text_only, encoder is not None
    check.bad, check.failing_at_load = scan.bad + failures, len(failures)
    check.usable = len(scan.valid) - len(failures)
    if not check.usable:
        check.problem = f"none of the {scan.total} samples is usable"
    elif len(check.bad) > recipe.data.max_bad_fraction * scan.total:
        check.problem = (
            f"{len(check.bad)} of {scan.total} samples are bad ({len(failures)} of them only when loaded in full), "
            f"more than data.max_bad_fraction {recipe.data.max_bad_fraction:g}"
        )
    return check


def _plan_processor(recipe: Recipe, config, source: str):
    """The processor a real run would use, if its files are on this machine; else None."""
    if source.startswith("preset"):
        return None
    try:
        if recipe.model.checkpoint:
            return checkpoint_processor(recipe, config, local_only=True)
        return processor_from_parts(recipe, local_only=True)[0]
    except UserError:
        return None


def run_blockers(stage: str, recipe: Recipe, resume: bool, data: DataCheck) -> list[str]:
    """Why a real run of this recipe would refuse to start or stop on its data, here and now."""
    blockers = [f"data: {data.problem}"] if data.problem else []
    if recipe.lora.enabled and recipe.lora.qlora and not torch.cuda.is_available():
        blockers.append("lora.qlora loads the language model in 4-bit, which needs a CUDA GPU")
    try:
        check_trackers(recipe)
    except UserError as err:
        blockers.append(str(err))
    train = recipe.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if train.global_batch_size % (train.per_device_batch_size * world_size):
        blockers.append(
            f"train.global_batch_size {train.global_batch_size} is not a multiple of per_device_batch_size "
            f"{train.per_device_batch_size} x {world_size} processes"
        )
    connector = recipe.model.pretrained_connector
    if connector and not Path(resolve_name(connector)).is_dir():
        blockers.append(
            f"model.pretrained_connector {connector} does not exist yet (run the pretrain stage first)"
        )
    holder = RunLock(train.output_dir).live_holder()
    if holder is not None:
        blockers.append(f"{train.output_dir} is in use by another run: {holder.describe()}")
    try:
        resume_from = check_output_dir(Path(train.output_dir), resume, train.overwrite_output_dir)
        if resume_from is not None:
            check_not_finished(recipe, resume_from)
            check_same_run(recipe, resume_from)
    except UserError as err:
        blockers.append(str(err))
    return blockers


def make_training_plan(stage: str, recipe: Recipe, resume: bool = False) -> TrainingPlan:
    check_stage(recipe, stage)
    config, source = model_config(recipe)
    pmod_enabled = recipe.pmod.enabled
    model = _meta_model(config, pmod_enabled, recipe)
    lora = ""
    if recipe.lora.enabled:  # the adapters' shapes do not depend on 4-bit weights
        model = add_lora(model, dataclasses.replace(recipe.lora, qlora=False), False)
        lora = describe(recipe.lora, adapted_layers(model))
    parameters = set_trainable(model, trained_parts(recipe, stage))
    if source.startswith(
        "preset"
    ):  # the preset's own numbers (e.g. Vicuna's 32000-token vocabulary)
        shape = get_preset(recipe.model.preset)
        if recipe.model.image_grid_pinpoints and shape.image_grid_pinpoints:
            pinpoints = tuple(tuple(p) for p in recipe.model.image_grid_pinpoints)
            shape = dataclasses.replace(shape, image_grid_pinpoints=pinpoints)
    else:
        checkpoint = (
            Path(resolve_name(recipe.model.checkpoint)) if recipe.model.checkpoint else None
        )
        # a checkpoint on this machine: its processors' files say what the config does not (Qwen-VL's pixel limits)
        shape = shape_from_hf_config(
            unwrap_lora(model).config,
            name=source,
            directory=checkpoint if checkpoint is not None and checkpoint.is_dir() else None,
        )
    ratios = unwrap_lora(model).retention_ratios if pmod_enabled else None
    pmod = recipe.pmod.config
    flops = count_flops(
        shape,
        ratios,
        routed_tokens=pmod.routed_tokens if pmod_enabled else "vision",
        mod_layers=pmod.mod_layers if pmod_enabled else None,
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = recipe.train.per_device_batch_size * world_size
    accumulation = max(recipe.train.global_batch_size // per_step, 1)
    rates = {part: recipe.part_learning_rate(part) for part in PARTS if parameters[part][0]}
    data = check_data(recipe, _plan_processor(recipe, config, source))
    return TrainingPlan(
        stage=stage,
        model_source=source,
        parameters=parameters,
        learning_rates=rates,
        flops=flops,
        shape=shape,
        world_size=world_size,
        accumulation=accumulation,
        data=data,
        pmod_enabled=pmod_enabled,
        blockers=run_blockers(stage, recipe, resume, data),
        lora=lora,
    )


def _millions(count: int) -> str:
    return f"{count / 1e6:,.2f} M" if count >= 1e5 else f"{count:,}"


def print_training_plan(plan: TrainingPlan, recipe: Recipe, console: Console | None = None) -> None:
    console = console or Console()
    console.print(
        f"[bold]{plan.stage}[/bold] plan for {recipe.source or 'the recipe'}  (dry run: nothing is trained)"
    )
    console.print(
        f"model: {plan.model_source}, layout {plan.shape.layout}, "
        f"{'p-MoD' if plan.pmod_enabled else 'dense (pmod.enabled = false)'}"
    )
    console.print(_parameters_table(plan))
    trainable = plan.trainable_parameters
    total = sum(n for _, n in plan.parameters.values())
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
    console.print(_run_table(plan, recipe))
    flops_plan = FlopsPlan(plan.shape, (PlanEntry(recipe.pmod.config, plan.flops),))
    console.print(summary_table(flops_plan))
    if plan.pmod_enabled:
        console.print(layer_table(flops_plan))
    _print_data_check(console, plan.data)
    for blocker in plan.blockers:
        console.print(f"a real run would stop: {blocker}", style="bold yellow")


def _parameters_table(plan: TrainingPlan) -> Table:
    parts = Table(title="Parameters per part")
    for name in ("part", "parameters", "trainable", "learning rate"):
        parts.add_column(name, justify="left" if name == "part" else "right")
    for part in PARTS:
        trainable, total = plan.parameters[part]
        if total == 0:
            continue
        rate = plan.learning_rates.get(part)
        parts.add_row(
            part,
            _millions(total),
            _millions(trainable) if trainable else "frozen",
            f"{rate:g}" if rate else "-",
        )
    trainable = plan.trainable_parameters
    total = sum(n for _, n in plan.parameters.values())
    parts.add_row("all", _millions(total), _millions(trainable), "", style="bold")
    if plan.lora:
        parts.caption = f"llm: LoRA adapters train, its own weights are frozen ({plan.lora})"
    return parts


def _run_table(plan: TrainingPlan, recipe: Recipe) -> Table:
    """Batch, steps, schedule, precision and where the run writes."""
    train = recipe.train
    run = Table(title="Run")
    run.add_column("", style="bold")
    run.add_column("value")
    steps = f"{train.max_steps}" if train.max_steps > 0 else f"{train.num_epochs:g} epoch(s)"
    if train.max_steps <= 0 and plan.data.usable:
        steps += f" = {int(plan.data.usable * train.num_epochs // train.global_batch_size)} steps"
    rows = [
        (
            "global batch",
            f"{train.global_batch_size} = {train.per_device_batch_size} per device x "
            f"{plan.accumulation} accumulation x {plan.world_size} process(es)",
        ),
        ("steps", steps),
        (
            "schedule",
            f"{train.lr_scheduler}, warmup {train.warmup_ratio:g}, weight decay {train.weight_decay:g}",
        ),
        (
            "precision",
            f"{train.precision} (auto: bf16 on GPU, fp32 on CPU)"
            if train.precision == "auto"
            else train.precision,
        ),
        ("gradient checkpointing", str(train.gradient_checkpointing).lower()),
        ("deepspeed", train.deepspeed or "none"),
        ("template / max length", f"{recipe.data.template} / {recipe.data.max_length}"),
        ("output", train.output_dir),
    ]
    if recipe.model.pretrained_connector:
        found = Path(resolve_name(recipe.model.pretrained_connector)).exists()
        rows.append(
            (
                "pretrained connector",
                recipe.model.pretrained_connector
                + ("" if found else "  [yellow](not there yet: run the pretrain stage first)"),
            )
        )
    for label, value in rows:
        run.add_row(label, value)
    return run


def _print_data_check(console: Console, data: DataCheck) -> None:
    """The data file's counts, then the first ten bad samples."""
    if data.found:
        checked = (
            "encoded" if data.encoded else "images decoded; lengths not checked (no tokenizer here)"
        )
        console.print(
            f"data: {data.path}: {data.total} samples, {data.usable} usable ({data.text_only} text-only), "
            f"{len(data.bad)} bad, {data.failing_at_load} of them only when loaded in full ({checked})"
        )
    for sample, reason in data.bad[:10]:
        console.print(f"  bad sample {sample}: {reason}", style="yellow")
    if len(data.bad) > 10:
        console.print(f"  ... and {len(data.bad) - 10} more bad samples", style="yellow")


def dry_run(
    stage: str, recipe: Recipe, console: Console | None = None, resume: bool = False
) -> TrainingPlan:
    """Plan and print; a UserError (exit code 2) if a real run would stop."""
    plan = make_training_plan(stage, recipe, resume=resume)
    print_training_plan(plan, recipe, console)
    if plan.blockers:
        more = (
            f" (and {len(plan.blockers) - 1} more, listed above)" if len(plan.blockers) > 1 else ""
        )
        raise UserError(f"a real run would stop: {plan.blockers[0]}{more}")
    return plan
