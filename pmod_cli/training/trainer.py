"""The HF Trainer, as p-MoD training needs it.

``PMoDTrainer`` adds to ``transformers.Trainer``:

- per-part learning rates: one optimizer parameter group per trained part (connector, llm,
  router, vision_tower), each with its recipe rate (the scheduler scales them all alike);
- a stop on a NaN / infinite loss, before the backward pass and on every rank at once, naming
  the last good checkpoint;
- atomic checkpoints: written under ``<output_dir>/.incomplete/`` and renamed to
  ``checkpoint-N`` once every rank has finished, with the resolved recipe inside, so a
  ``checkpoint-N`` directory is always complete (``--resume`` never sees a half-written one);
- counts of samples, tokens, vision tokens and samples skipped while loading, for the summary.

``RichProgressCallback`` replaces tqdm with a rich progress bar and loss lines.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    get_last_checkpoint,
    rotate_checkpoints,
)

from ..errors import UserError
from .build import PARTS, part_of

STAGING_DIR = ".incomplete"
RECIPE_FILE = "recipe.toml"


class _BlankImagePass:
    """The vision tower and projector run once on a blank image (see ``_blank_image_pass``)."""

    def __init__(self, llava) -> None:
        self.llava = llava
        self.features: torch.Tensor | None = None
        self.handle = None

    def run(self) -> None:
        if self.features is not None:
            return
        config = self.llava.config
        size = config.vision_config.image_size
        weight = next(self.llava.multi_modal_projector.parameters())
        pixels = torch.zeros(1, 3, size, size, dtype=weight.dtype, device=weight.device)
        states = self.llava.vision_tower(pixels, output_hidden_states=True).hidden_states
        layer = config.vision_feature_layer
        selected = (
            torch.cat([states[i] for i in layer], dim=-1)
            if isinstance(layer, (list, tuple))
            else states[layer]
        )
        self.features = self.llava.multi_modal_projector(selected)


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stopped before the optimizer step."""


@dataclass
class RunCounts:
    """What this process fed the model (summed over ranks for the summary)."""

    samples: int = 0
    tokens: int = 0  # real (non-padding) tokens, image tokens included
    vision_tokens: int = 0
    skipped_at_load: int = 0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [self.samples, self.tokens, self.vision_tokens, self.skipped_at_load],
            dtype=torch.float64,
        )


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest complete ``checkpoint-N`` in ``output_dir`` (staged ones are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = get_last_checkpoint(str(output_dir))
    return Path(found) if found else None


def on_every_rank(flag: bool, device: torch.device | str) -> bool:
    """True only if ``flag`` holds on every process (a collective: every rank must call it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


class PMoDTrainer(Trainer):
    def __init__(
        self,
        *args,
        part_learning_rates: dict[str, float],
        image_token_id: int,
        recipe_toml: str,
        bad_sample_budget: float = float("inf"),
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.part_learning_rates = part_learning_rates
        self.image_token_id = image_token_id
        self.recipe_toml = recipe_toml
        # how many more samples may fail while loading before the run stops
        self.bad_sample_budget = bad_sample_budget
        self.counts = RunCounts()
        self._staging_root: str | None = None

    # ---- optimizer: one group per part ---------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(model))
        groups = []
        for part in PARTS:
            for with_decay in (True, False):
                params = [
                    p
                    for name, p in model.named_parameters()
                    if p.requires_grad
                    and part_of(name) == part
                    and (name in decay_names) == with_decay
                ]
                if params:
                    groups.append(
                        {
                            "params": params,
                            "lr": self.part_learning_rates[part],
                            "weight_decay": self.args.weight_decay if with_decay else 0.0,
                        }
                    )
        optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_class(groups, **optimizer_kwargs)
        return self.optimizer

    # ---- the step: counting, NaN stop ----------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("num_skipped", None)
        if skipped is not None:
            self.counts.skipped_at_load += int(skipped)
            passes = (
                int(self.state.epoch or 0) + 1
            )  # each pass over the data meets its bad samples again
            if self.counts.skipped_at_load > self.bad_sample_budget * passes:
                raise UserError(
                    f"{self.counts.skipped_at_load} samples failed while loading, more than data.max_bad_fraction "
                    "allows; see the warnings above and fix the data or raise data.max_bad_fraction"
                )
        if model.training:
            mask = inputs["attention_mask"]
            self.counts.samples += int(mask.shape[0])
            self.counts.tokens += int(mask.sum())
            self.counts.vision_tokens += int((inputs["input_ids"] == self.image_token_id).sum())
        blank = (
            self._blank_image_pass(model)
            if model.training and inputs.get("pixel_values") is None
            else None
        )
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            if blank is not None:
                blank.handle.remove()
        if (
            blank is not None and blank.features is not None
        ):  # adds 0, but gives the tower a gradient
            zero = 0.0 * blank.features.sum()
            result = (result[0] + zero, *result[1:]) if return_outputs else result + zero
        if model.training:
            self._stop_on_non_finite(result[0] if return_outputs else result)
        return result

    def _blank_image_pass(self, model) -> _BlankImagePass | None:
        """Under ZeRO-3 each module's weights are gathered collectively when it runs, and its
        gradients reduced collectively in the backward pass. A process whose micro-batch holds
        no image would skip the vision tower and the projector while the others run them, and
        the processes' collectives would no longer match (a crash or a hang). Such a process runs
        them on a blank image where the others do (just before the language model), and adds
        0 x its features to the loss; LLaVA's own training does the same."""
        if not self.is_deepspeed_enabled or self.accelerator.state.deepspeed_plugin.zero_stage != 3:
            return None
        llava = self.accelerator.unwrap_model(model).model  # LlavaModel / LlavaNextModel
        blank = _BlankImagePass(llava)
        # prepended: it must run before ZeRO-3's own hook gathers the language model
        blank.handle = llava.language_model.register_forward_pre_hook(
            lambda module, args: blank.run(), prepend=True
        )
        return blank

    def _stop_on_non_finite(self, loss: torch.Tensor) -> None:
        """Raise on every rank, before the backward pass (DeepSpeed steps inside it), if any
        rank's loss is NaN or infinite."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if on_every_rank(finite, loss.device):
            return
        step = self.state.global_step + 1
        value = (
            float(loss.detach().float().mean())
            if not finite
            else "NaN or infinite on another process"
        )
        previous = last_checkpoint(self.args.output_dir)
        where = (
            f"the last good checkpoint is {previous}"
            if previous
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"the training loss became {value} at step {step}; stopped before the optimizer step, "
            f"{where}. Lower train.learning_rate (or check the data) and run again"
            + (" with --resume" if previous else "")
        )

    # ---- resuming ------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # they load their own shards
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        # transformers 5 saves LLaVA weights under their original checkpoint names
        # ("language_model.model.layers..."); from_pretrained maps them back, the Trainer's plain
        # load_state_dict would miss every key and silently resume from the current weights
        dtype = next(model.parameters()).dtype
        reloaded = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype)
        model.load_state_dict(reloaded.state_dict(), strict=True)

    # ---- atomic checkpoints --------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        output_dir = Path(self.args.output_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:  # a half-written staging folder left by a crashed run
            shutil.rmtree(output_dir / STAGING_DIR / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = str(output_dir / STAGING_DIR)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every rank's shards are written
        if self.args.should_save:
            staged = output_dir / STAGING_DIR / name
            (staged / RECIPE_FILE).write_text(self.recipe_toml)
            final = output_dir / name
            if final.exists():  # the same step of an earlier, overwritten run
                shutil.rmtree(final)
            os.replace(staged, final)
            if self.args.save_total_limit:
                rotate_checkpoints(str(output_dir), save_total_limit=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def publish_model(trainer: PMoDTrainer, output_dir: Path) -> None:
    """Save the final model (weights, config, processor, recipe) at the root of ``output_dir``.

    Files are staged, then moved in one by one: the old config.json goes first, the new one
    comes last, so a directory with a config.json always holds a whole model.
    """
    staging = output_dir / STAGING_DIR / "final"
    if trainer.args.should_save and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # on every rank: ZeRO-3 gathers the weights
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        new_files = {path.name for path in staging.iterdir() if path.is_file()}
        saved = any(
            name.startswith("model") and name.endswith(".safetensors") for name in new_files
        )
    else:
        saved = True
    if not on_every_rank(saved, trainer.args.device):
        raise UserError(
            f"no model weights were saved to {staging} (a DeepSpeed ZeRO-3 config needs "
            '"stage3_gather_16bit_weights_on_model_save": true); the checkpoints in '
            f"{output_dir} are kept"
        )
    if trainer.args.should_save:
        (staging / RECIPE_FILE).write_text(trainer.recipe_toml)
        new_files.add(RECIPE_FILE)
        (output_dir / "config.json").unlink(missing_ok=True)
        for stale in output_dir.glob(
            "model*.safetensors*"
        ):  # weights of an earlier, differently sharded save
            if stale.name not in new_files:
                stale.unlink()
        for name in sorted(new_files - {"config.json"}) + ["config.json"]:
            os.replace(staging / name, output_dir / name)
        shutil.rmtree(output_dir / STAGING_DIR, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


class WallClock(TrainerCallback):
    """Times the training loop itself (after model wrapping and DeepSpeed's set-up)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.start is None:
            return 0.0
        return (self.end or time.perf_counter()) - self.start


class RichProgressCallback(TrainerCallback):
    """A rich progress bar over the optimizer steps, and one line per logged loss."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task(
            self.description, total=state.max_steps, completed=state.global_step, loss=""
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs or "loss" not in logs:
            return
        self.progress.update(self.task, loss=f"loss {logs['loss']:.4f}")
        parts = [f"step {state.global_step:>5}", f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "grad_norm" in logs:
            parts.append(f"grad norm {float(logs['grad_norm']):.3f}")
        self.progress.console.print("  ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
