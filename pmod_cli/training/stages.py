"""The two training stages, as plain functions of a recipe.

    result = pretrain(load_recipe("recipes/tiny_pretrain.toml"))
    result = sft(load_recipe("recipes/tiny.toml"), resume=True)

Pretrain trains the connector of a dense model on captions; sft trains connector + LLM +
routers (and, if asked, the vision tower) of the p-MoD model (``pmod.enabled = false``: the
dense baseline, same pipeline). Both run on the HF Trainer, under ``torchrun`` or the
``deepspeed`` launcher as they are: the gradient accumulation is derived from the recipe's
global batch size and the world size found at launch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path

import torch

from ..data.llava_data import (
    Collator,
    SampleEncoder,
    ScanResult,
    SupervisedDataset,
    load_records,
    scan_records,
)
from ..data.templates import CHAT_TEMPLATE, get_template
from ..errors import UserError
from ..model.families import family_for_model, family_for_processor
from .build import build_model
from .checkpoints import STAGING_DIR
from .interrupt import (
    SAVE_ON_STOP_SECONDS,
    RunInterrupted,
    SignalWatch,
    StopOnSignal,
    signal_name,
)
from .lora import unwrap_lora
from .paths import check_output_dir, data_paths
from .plan import dry_run as plan_and_print
from .recipe import DEEPSPEED_PRESETS, Recipe, load_recipe
from .resume import check_not_finished, check_same_run
from .run_lock import RunLock
from .summary import efficiency_summary, summary_table
from .throughput import peak_tflops
from .tracking import check_trackers, tracker_environment, trackers
from .trainer import PMoDTrainer, RichProgressCallback, WallClock, publish_model

# imported where used: datasets and deepspeed (the train extra), transformers' training pieces

logger = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: str
    output_dir: Path
    summary: dict
    log_history: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) of every logged training step."""
        return [(entry["step"], entry["loss"]) for entry in self.log_history if "loss" in entry]


def pretrain(recipe: Recipe, resume: bool = False, callbacks: Sequence = ()) -> StageResult:
    """Stage 1: train the connector (captions, ``plain`` template)."""
    return run_stage("pretrain", recipe, resume=resume, callbacks=callbacks)


def sft(recipe: Recipe, resume: bool = False, callbacks: Sequence = ()) -> StageResult:
    """Stage 2: train connector + LLM + routers (instructions), p-MoD unless ``pmod.enabled`` is false."""
    return run_stage("sft", recipe, resume=resume, callbacks=callbacks)


# ---- pieces -------------------------------------------------------------------------------


def deepspeed_config_path(value: str) -> str:
    """``zero2`` / ``zero3`` -> the shipped JSON; anything else is a path."""
    if value in DEEPSPEED_PRESETS:
        return str(resources.files("pmod_cli.training") / "deepspeed" / f"{value}.json")
    return value


def resolve_precision(precision: str, on_gpu: bool) -> str:
    if precision == "auto":
        return (
            "bf16" if on_gpu and torch.cuda.is_bf16_supported() else ("fp16" if on_gpu else "fp32")
        )
    if precision in ("bf16", "fp16") and not on_gpu:
        logger.warning("train.precision = %s needs a GPU; training in fp32 on the CPU", precision)
        return "fp32"
    return precision


def prepare_data(recipe: Recipe, processor, quiet: bool = False):
    """Records read and checked, the encoding dataset and its collator."""
    data_path, image_folder = data_paths(recipe)
    if recipe.data.image_folder and not image_folder.is_dir():
        raise UserError(f"data.image_folder {image_folder} is not a directory")
    records = load_records(data_path)
    data_logger = logging.getLogger("pmod_cli.data.llava_data")
    previous_level = data_logger.level
    if quiet:  # one rank names the bad samples, the others only count them
        data_logger.setLevel(logging.ERROR)
    try:
        scan = scan_records(
            records,
            image_folder,
            recipe.data.max_bad_fraction,
            recipe.data.check_images,
            progress=not quiet,
        )
    finally:
        data_logger.setLevel(previous_level)
    template = recipe.data.template
    encoder = SampleEncoder(
        processor,
        template if template == CHAT_TEMPLATE else get_template(template),
        recipe.data.max_length,
    )
    dataset = SupervisedDataset(
        records, scan.valid, image_folder, encoder, video_frames=recipe.data.video_frames
    )
    family = family_for_processor(processor)
    token_types = family.token_types(processor) if family is not None else None
    return dataset, Collator(processor.tokenizer.pad_token_id, token_types), scan


def _clear_output_dir(output_dir: Path, is_main: bool) -> None:
    """Remove the checkpoints of an earlier run (``overwrite_output_dir``); only once model and
    data are built, so a recipe error never costs a finished run its checkpoints."""
    if is_main:
        for old in output_dir.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(output_dir / STAGING_DIR, ignore_errors=True)


def _training_arguments(
    recipe: Recipe, accumulation: int, precision: str, on_gpu: bool, world_size: int
):
    from transformers import TrainingArguments
    from transformers.utils import is_torch_tf32_available

    train = recipe.train
    tf32 = train.tf32 and on_gpu and is_torch_tf32_available()
    if train.tf32 and on_gpu and not tf32:
        logger.warning("train.tf32 = true needs an Ampere or newer GPU; training without TF32")
    return TrainingArguments(
        output_dir=train.output_dir,
        per_device_train_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=train.max_steps,
        num_train_epochs=train.num_epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # below 1: a fraction of the steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}
        if train.gradient_checkpointing
        else None,
        deepspeed=deepspeed_config_path(train.deepspeed) if train.deepspeed else None,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit or None,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach the log (and stop the run), not vanish
        seed=train.seed,
        dataloader_num_workers=train.dataloader_num_workers,
        remove_unused_columns=False,
        report_to=trackers(recipe) or "none",
        run_name=Path(train.output_dir).name or None,
        tf32=True if tf32 else None,  # None leaves torch's setting (TF32 off) alone
        disable_tqdm=True,
        use_cpu=not on_gpu,
        ddp_backend="gloo" if not on_gpu and world_size > 1 else None,
        # text-only batches leave the connector unused, which DDP must tolerate
        ddp_find_unused_parameters=True if not train.deepspeed else None,
    )


def _reduce_counts(counts, args) -> list[float]:
    values = counts.as_tensor()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.to(args.device)
        torch.distributed.all_reduce(values)
    return values.cpu().tolist()


# ---- the stage ----------------------------------------------------------------------------


def run_stage(
    stage: str, recipe: Recipe, resume: bool = False, callbacks: Sequence = ()
) -> StageResult:
    """Build, train, save and summarise one stage; returns the summary and the loss log.

    The output directory is locked for the run (rank 0 holds the lock for every process); a
    SIGINT / SIGTERM stops it at a step boundary (see ``interrupt``)."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    watch = SignalWatch()
    lock = RunLock(recipe.train.output_dir)
    with watch.installed():
        try:
            if _is_main():
                lock.acquire()
            return _locked_stage(stage, recipe, resume, callbacks, watch)
        finally:
            lock.release()


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class _Run:
    """What a stage builds before it trains."""

    trainer: PMoDTrainer
    scan: ScanResult
    clock: WallClock
    progress: RichProgressCallback
    world_size: int
    on_gpu: bool
    resume_from: Path | None


def _locked_stage(
    stage: str, recipe: Recipe, resume: bool, callbacks: Sequence, watch
) -> StageResult:
    run = _build_run(stage, recipe, resume, callbacks)
    trainer = run.trainer
    stop = StopOnSignal(watch, trainer.expected_save_seconds)
    trainer.add_callback(stop)
    watch.describe_now = lambda signum: _resume_hint(trainer)
    watch.phase = "training"
    try:
        with tracker_environment(recipe, is_main=_is_main()):
            trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    finally:
        run.progress.on_train_end(trainer.args, trainer.state, trainer.control)
    watch.phase = "finishing"  # a signal from here on waits: saving the model takes seconds
    trainer.finish_checkpoints()
    if stop.stopped_at is not None:
        _raise_stopped(trainer, stop, watch.received)
    return _finish_stage(stage, recipe, run)


def _build_run(stage: str, recipe: Recipe, resume: bool, callbacks: Sequence) -> _Run:
    """Model, data and trainer of a stage, after the output directory is checked."""
    import transformers
    from transformers import PrinterCallback

    train = recipe.train
    check_trackers(recipe)
    # the Trainer seeds again later; this covers what is created before it (fresh connector,
    # image newline, routers)
    transformers.set_seed(train.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = _accumulation(recipe, world_size)
    output_dir = Path(train.output_dir)
    resume_from = check_output_dir(output_dir, resume, train.overwrite_output_dir)
    if resume_from is not None:
        check_not_finished(recipe, resume_from)

    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(train.precision, on_gpu)
    # DeepSpeed keeps fp32 master weights itself, so the model can load in half precision
    load_dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if train.deepspeed else None
    )
    # built before the arguments exist, so outside ZeRO-3's zero.Init: the parts' meta-device
    # shell, the connector copy and the routers need whole parameters; DeepSpeed partitions the
    # model when it starts
    model, processor = build_model(recipe, stage, load_dtype or torch.float32)
    if resume_from is not None:  # after building: pmod.mod_layers_from is read by then
        check_same_run(recipe, resume_from)
    args = _training_arguments(recipe, accumulation, precision, on_gpu, world_size)
    if train.deepspeed and world_size > 1:
        import deepspeed

        # ZeRO-3 asks DeepSpeed's own comm layer for the world size; on CPU nothing has set that
        # layer up yet (it wraps the existing process group)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    dataset, collator, scan = prepare_data(recipe, processor, quiet=not _is_main())

    progress = RichProgressCallback(f"{stage} {recipe.source or ''}".strip())
    clock = WallClock()
    trainer = PMoDTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[clock, progress, *callbacks],
        recipe=recipe,
        vision_mask=partial(family_for_model(unwrap_lora(model)).vision_mask, config=model.config),
        bad_sample_budget=recipe.data.max_bad_fraction * scan.total - len(scan.bad),
    )
    trainer.remove_callback(PrinterCallback)  # the rich callback prints the losses
    if resume_from is None and train.overwrite_output_dir:
        _clear_output_dir(output_dir, _is_main())
        trainer.accelerator.wait_for_everyone()
    return _Run(trainer, scan, clock, progress, world_size, on_gpu, resume_from)


def _accumulation(recipe: Recipe, world_size: int) -> int:
    """Gradient accumulation steps: global batch / (per-device batch x processes)."""
    train = recipe.train
    per_step = train.per_device_batch_size * world_size
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size {train.global_batch_size} is not a multiple of per_device_batch_size "
            f"{train.per_device_batch_size} x {world_size} processes; change one of them"
        )
    return train.global_batch_size // per_step


def _resume_hint(trainer) -> str:
    """What ``--resume`` starts from now."""
    if trainer.published is None:
        return "no checkpoint was saved yet: run again without --resume to start"
    step = trainer.published.name.rsplit("-", 1)[1]
    return f"add --resume to the same command to continue from {trainer.published} (step {step})"


def _raise_stopped(trainer, stop, signum: int | None) -> None:
    signum = signum or signal.SIGTERM  # another process was signalled: the launcher's usual signal
    where = (
        f"stopped by {signal_name(signum)} at step {stop.stopped_at} of {trainer.state.max_steps}"
    )
    if stop.saved_on_stop and trainer.published is not None:
        raise RunInterrupted(
            f"{where} and saved {trainer.published} there; add --resume to the same command to continue from "
            f"step {stop.stopped_at}",
            signum,
        )
    saved = (
        f"not saved there (a checkpoint takes about {stop.estimated_seconds:.0f} s, more than the "
        f"{SAVE_ON_STOP_SECONDS:.0f} s a stop allows)"
    )
    raise RunInterrupted(f"{where}, {saved}; {_resume_hint(trainer)}", signum)


def _finish_stage(stage: str, recipe: Recipe, run: _Run) -> StageResult:
    """Publish the final model, then write and print the summary."""
    from rich.console import Console

    trainer, scan = run.trainer, run.scan
    output_dir = Path(recipe.train.output_dir)
    wall = run.clock.seconds
    trainer.check_final_weights()
    publish_model(trainer, output_dir)

    samples, tokens, vision_tokens, skipped_at_load = _reduce_counts(trainer.counts, trainer.args)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    half = trainer.args.bf16 or trainer.args.fp16
    summary = efficiency_summary(
        trainer.hf_model,
        stage=stage,
        samples=int(samples),
        tokens=int(tokens),
        vision_tokens=int(vision_tokens),
        wall_seconds=wall,
        processes=run.world_size,
        on_gpu=run.on_gpu,
        steps=trainer.state.global_step,
        skipped_bad=len(scan.bad),
        skipped_at_load=int(skipped_at_load),
        total_samples=scan.total,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        peak_memory_bytes=trainer.meter.run_peak(trainer.args.device),
        peak_tflops=peak_tflops(trainer.args.device) if run.on_gpu and half else None,
        kept_ratios=trainer.meter.run_kept_ratios(),
        trainable_parameters=sum(
            getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad
        ),
        lora=trainer.lora,
    )
    if trainer.is_world_process_zero():
        try:
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        except OSError as err:
            raise UserError(
                f"the model is saved in {output_dir}, but summary.json is not: {err.strerror or err}"
            ) from None
        console = Console()
        console.print(summary_table(summary))
        console.print(f"model saved to {output_dir}")
    return StageResult(stage, output_dir, summary, list(trainer.state.log_history))


def launch(
    stage: str,
    recipe_path: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    dry_run: bool = False,
):
    """What ``pmod pretrain`` / ``pmod sft`` do: load the recipe, then plan or train."""
    recipe = load_recipe(recipe_path, overrides)
    if dry_run:
        return plan_and_print(stage, recipe, resume=resume)
    return run_stage(stage, recipe, resume=resume)
