"""The HF Trainer, as p-MoD training needs it.

``PMoDTrainer`` adds to ``transformers.Trainer``:

- per-part learning rates: one optimizer parameter group per trained part (connector, llm,
  router, vision_tower), each with its recipe rate (the scheduler scales them all alike); on
  ``--resume`` the recipe's rates replace those saved with the optimizer, so a run that
  diverged can continue from its last checkpoint at a lower rate;
- a stop on divergence, on every rank at once: a NaN / infinite loss (before the backward
  pass) or gradient norm (before the optimizer step; DeepSpeed steps inside the backward pass,
  so there it is after), naming the last verified checkpoint and the ``--resume`` that
  continues from it at lower rates;
- checkpoints that are whole and finite: each is checked for NaN / infinite weights and
  optimizer state, written under ``<output_dir>/.incomplete/``, and renamed to
  ``checkpoint-N`` only once the next step has computed a finite loss and gradients from it
  (or training ends), with the resolved recipe inside; a ``checkpoint-N`` directory is always
  complete and never diverged. A save that fails (a full disk) removes its partial directory
  and says how much space a checkpoint needs;
- counts of samples, tokens, vision tokens and samples skipped while loading, for the summary,
  and the efficiency figures of every logged step (``throughput.py``);
- with ``[lora]`` (a PEFT model): checkpoints that are adapter directories (``lora.py``), a
  ``--resume`` that loads them, and ``save_model`` writing the final model merged (unless
  ``lora.save = "adapter"``);
- ``train.group_by_modality_length``: batches of one modality (``sampler.py``).

``RichProgressCallback`` replaces tqdm with a rich progress bar and loss lines.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..errors import UserError
from ..model.adapters import (
    ADAPTER_FILES,
    ADAPTER_INFO_FILE,
    FULL_WEIGHTS_FILE,
    PEFT_WEIGHTS_FILE,
)
from ..model.routing import recording
from ..model.weights import check_weight_files, read_file
from .build import PARTS, part_of
from .checkpoints import (
    RECIPE_FILE,
    STAGING_DIR,
    checkpoint_bytes,
    first_non_finite,
    free_bytes,
    human_bytes,
    is_out_of_space,
    last_checkpoint,
)
from .interrupt import RunInterrupted, on_every_rank
from .lora import (
    PEFT_PREFIX,
    adapter_info,
    full_trained_names,
    is_lora_model,
    unwrap_lora,
    write_adapter,
    write_merged,
)
from .recipe import Recipe
from .sampler import ModalityLengthSampler, modality_lengths
from .throughput import StepMeter

__all__ = [
    "RECIPE_FILE",
    "STAGING_DIR",
    "PMoDTrainer",
    "last_checkpoint",
    "on_every_rank",
    "publish_model",
]

# write speed assumed for a checkpoint not yet timed in this run (a local SSD does better)
ASSUMED_WRITE_BYTES_PER_SECOND = 500e6


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
    """The run diverged: a NaN or infinite loss, gradient norm or weight; nothing after the last
    verified checkpoint was saved."""


class CheckpointSpaceError(UserError):
    """A checkpoint (or the final model) did not fit on the disk; its partial copy was removed."""


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


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:  # not empty (or gone): left as it is
        pass


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


class PMoDTrainer(Trainer):
    def __init__(
        self,
        *args,
        recipe: Recipe,
        vision_mask,
        bad_sample_budget: float = float("inf"),
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.recipe_toml = recipe.to_toml()
        self.part_learning_rates = {part: recipe.part_learning_rate(part) for part in PARTS}
        self.vision_mask = vision_mask  # input_ids -> (batch, seq) bool: image and video tokens
        # how many more samples may fail while loading before the run stops
        self.bad_sample_budget = bad_sample_budget
        self.counts = RunCounts()
        self.published: Path | None = None  # the last checkpoint verified and in place
        self.last_save_seconds: float | None = None
        self._pending: Path | None = None  # staged; published once the next step is finite
        self._group_parts: list[str] = []  # the part of each optimizer parameter group
        self._staging_root: str | None = None
        self.lora = is_lora_model(self.model)
        self.full_names = full_trained_names(self.model) if self.lora else []
        self.adapter_info = adapter_info(recipe, self.model) if self.lora else None
        self.meter = StepMeter(
            unwrap_lora(self.model), half_precision=self.args.bf16 or self.args.fp16
        )
        self.add_callback(self.meter)

    @property
    def hf_model(self):
        """The HF model being trained, inside the DeepSpeed / DDP and PEFT wrappers."""
        return unwrap_lora(self.accelerator.unwrap_model(self.model))

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
                            "pmod_decay": with_decay,
                        }
                    )
                    self._group_parts.append(part)
        optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_class(groups, **optimizer_kwargs)
        return self.optimizer

    def _apply_recipe_rates(self) -> None:
        """The optimizer and scheduler states loaded on ``--resume`` carry the rates and weight
        decay the checkpoint was trained with; the recipe's replace them (the scheduler's factor
        for the current step kept), so a resume at a lower rate trains at that rate."""
        scheduler = getattr(
            self.lr_scheduler, "scheduler", self.lr_scheduler
        )  # accelerate's wrapper
        groups = self.optimizer.param_groups
        if len(groups) != len(self._group_parts):  # not the optimizer create_optimizer made
            return
        base_rates = getattr(scheduler, "base_lrs", None)
        factors = getattr(scheduler, "lr_lambdas", None)
        for index, (group, part) in enumerate(zip(groups, self._group_parts, strict=True)):
            rate = self.part_learning_rates[part]
            group["initial_lr"] = rate
            if group.get("pmod_decay"):
                group["weight_decay"] = self.args.weight_decay
            if base_rates is not None:
                base_rates[index] = rate
            group["lr"] = rate * (
                factors[index](scheduler.last_epoch) if factors is not None else 1.0
            )
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in groups]

    # ---- the step: counting, divergence stop -----------------------------------------------

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
            self.counts.vision_tokens += int(self.vision_mask(inputs["input_ids"]).sum())
        no_vision = not any(key.startswith("pixel_values") for key in inputs)
        blank = self._blank_image_pass(model) if model.training and no_vision else None
        try:
            with recording(self.meter.counter if model.training else None):
                result = super().compute_loss(
                    model,
                    inputs,
                    return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch,
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
        llava = unwrap_lora(
            self.accelerator.unwrap_model(model)
        ).model  # LlavaModel / LlavaNextModel / LlavaOnevisionModel
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
        value = (
            float(loss.detach().float().mean())
            if not finite
            else "NaN or infinite on another process"
        )
        self._diverged(
            f"the training loss became {value} at step {self.state.global_step + 1}",
            "before its backward pass",
        )

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm of this step, checked on every rank before the optimizer step: a
        NaN or infinite norm stops the run; a finite one publishes the checkpoint staged at the
        previous step (its weights gave a finite loss and finite gradients)."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        finite = grad_norm is None or math.isfinite(float(grad_norm))
        if on_every_rank(finite, self.args.device):
            self._publish_pending()
        elif not self.args.fp16:  # fp16's loss scaling skips such a step by itself
            shown = float(grad_norm) if not finite else "NaN or infinite on another process"
            step = self.state.global_step + 1
            # DeepSpeed steps inside the backward pass: its gradient norm is known only after
            when = (
                "after DeepSpeed applied the step"
                if self.is_deepspeed_enabled
                else "before the optimizer step"
            )
            self._diverged(
                f"the gradients became non-finite at step {step} (grad norm {shown})", when
            )
        return grad_norm

    def _diverged(self, what: str, when: str) -> None:
        """Stop (``when``: at which point of the step): drop the checkpoint waiting for this
        step's verdict and name the last verified one."""
        self._discard_pending()
        flags = " ".join(f"--set {key}={value:g}" for key, value in self._lower_rates().items())
        if self.published is not None:
            advice = (
                f"the last verified checkpoint is {self.published} (step {_step_of(self.published)}); to continue "
                f"from it at lower learning rates, add --resume {flags} to the command that started this run"
            )
        else:
            advice = f"no checkpoint was verified yet; run again at lower learning rates ({flags})"
        raise NonFiniteLossError(f"{what}; stopped {when}, nothing after it was saved: {advice}")

    def _lower_rates(self) -> dict[str, float]:
        """A tenth of the rate of every trained part, under the recipe key that sets it."""
        rates = {}
        for part in dict.fromkeys(self._group_parts):
            own = getattr(self.recipe.train, f"{part}_lr") > 0
            rates[f"train.{part}_lr" if own else "train.learning_rate"] = (
                self.part_learning_rates[part] / 10
            )
        return rates

    # ---- resuming ------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # they load their own shards
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        if self.lora:
            return self._load_adapter_checkpoint(Path(resume_from_checkpoint), model)
        check_weight_files(resume_from_checkpoint)
        # transformers 5 saves LLaVA weights under their original checkpoint names
        # ("language_model.model.layers..."); from_pretrained maps them back, the Trainer's plain
        # load_state_dict would miss every key and silently resume from the current weights
        dtype = next(model.parameters()).dtype
        reloaded = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype)
        model.load_state_dict(reloaded.state_dict(), strict=True)

    def _load_adapter_checkpoint(self, checkpoint: Path, model) -> None:
        """A LoRA run's checkpoint (an adapter directory) into the PEFT model: the adapter and
        the parts trained in full, every one of them."""
        from peft import set_peft_model_state_dict

        for name in (PEFT_WEIGHTS_FILE, FULL_WEIGHTS_FILE):
            if not (checkpoint / name).is_file():
                raise UserError(
                    f"--resume: {checkpoint} has no {name}; it is not a checkpoint of a LoRA run"
                )
        result = set_peft_model_state_dict(model, read_file(checkpoint / PEFT_WEIGHTS_FILE))
        missing = [key for key in result.missing_keys if ".lora_" in key]
        if missing or result.unexpected_keys:
            raise UserError(
                f"--resume: the adapter in {checkpoint} does not fit this run's ({(missing or result.unexpected_keys)[0]})"
            )
        full = read_file(checkpoint / FULL_WEIGHTS_FILE)
        parameters = dict(model.named_parameters())
        absent = sorted(set(self.full_names) - {PEFT_PREFIX + name for name in full})
        if absent:
            raise UserError(f"--resume: {checkpoint}/{FULL_WEIGHTS_FILE} lacks {absent[0]}")
        with torch.no_grad():
            for name, tensor in full.items():
                parameters[PEFT_PREFIX + name].copy_(tensor)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self._apply_recipe_rates()
        bad = first_non_finite(self.model, self.optimizer)
        if not on_every_rank(bad is None, self.args.device):
            raise UserError(
                f"--resume: {checkpoint} holds NaN or infinite values ({bad or 'on another process'}): it was saved "
                "after the run had diverged, by a pmod that did not check checkpoints; delete it to resume from "
                "the checkpoint before it, or start over"
            )
        self.published = Path(checkpoint)

    # ---- checkpoints: staged, verified, published ------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A LoRA run saves adapter directories (``lora.py``); other runs as the Trainer does."""
        if not self.lora:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        directory = Path(output_dir or self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.model.state_dict()
        if not state_dict:  # ZeRO-3 without gathering: DeepSpeed's own shards hold the weights
            return
        write_adapter(self.model, directory, state_dict, self.adapter_info, self.full_names)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(directory))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The final model (``_internal_call``: a checkpoint's weights, as the Trainer saves
        them). A LoRA run's is merged into an ordinary HF checkpoint, unless ``lora.save`` is
        ``adapter``; under DeepSpeed every process takes part."""
        if not self.lora or _internal_call or self.recipe.lora.save == "adapter":
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.is_deepspeed_enabled:
            try:
                state_dict = self.accelerator.get_state_dict(self.deepspeed)  # ZeRO-3 gathers
            except ValueError:  # weights not gathered on save: publish_model says so
                return
        else:
            state_dict = self.model.state_dict() if self.args.should_save else None
        if self.args.should_save:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            write_merged(self.model, output_dir, state_dict, self.processing_class)

    # ---- logging and sampling ------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training step's log: on every process (a collective)
            logs.update(self.meter.metrics(self.counts.as_tensor(), self.args.device))
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        if not self.recipe.train.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return ModalityLengthSampler(
            modality_lengths(dataset.records, dataset.indices),
            global_batch=self.recipe.train.global_batch_size,
            micro_batch=self.args.per_device_train_batch_size,
            seed=self.args.seed,
        )

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        output_dir = Path(self.args.output_dir)
        staged = output_dir / STAGING_DIR / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        self._publish_pending()  # one left by a step fp16 skipped: its weights were checked
        bad = first_non_finite(self.model, self.optimizer)
        if not on_every_rank(bad is None, self.args.device):
            self._diverged(
                f"the weights became NaN or infinite at step {step} ({bad or 'on another process'})",
                "there",
            )
        if self.args.should_save:  # a half-written staging folder left by a crashed run
            shutil.rmtree(staged, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        started = time.perf_counter()
        failure = self._write_staged(model, trial, staged)
        if not on_every_rank(failure is None, self.args.device):
            raise_save_failure(self, staged, failure, f"checkpoint-{step}", with_optimizer=True)
        self.accelerator.wait_for_everyone()  # every rank's shards are written
        self.last_save_seconds = time.perf_counter() - started
        self._pending = staged

    def _write_staged(self, model, trial, staged: Path) -> Exception | None:
        self._staging_root = str(staged.parent)
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                (staged / RECIPE_FILE).write_text(self.recipe_toml)
        except RunInterrupted:
            raise
        except Exception as err:  # noqa: BLE001 - judged by raise_save_failure, on every rank together
            return err
        finally:
            self._staging_root = None
        return None

    def _publish_pending(self) -> None:
        staged, self._pending = self._pending, None
        if staged is None:
            return
        final = staged.parent.parent / staged.name
        if self.args.should_save:
            if final.exists():  # the same step of an earlier, overwritten run
                shutil.rmtree(final)
            os.replace(staged, final)
            _remove_if_empty(staged.parent)
            if self.args.save_total_limit:
                rotate_checkpoints(str(final.parent), save_total_limit=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()
        self.published = final

    def _discard_pending(self) -> None:
        staged, self._pending = self._pending, None
        if staged is not None and self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
            _remove_if_empty(staged.parent)

    def finish_checkpoints(self) -> None:
        """Publish the checkpoint of the last step (no step follows to verify it further)."""
        self._publish_pending()

    def check_final_weights(self) -> None:
        bad = first_non_finite(self.accelerator.unwrap_model(self.model))
        if not on_every_rank(bad is None, self.args.device):
            self._diverged(
                f"the final weights are NaN or infinite ({bad or 'on another process'})", "there"
            )

    def expected_save_seconds(self) -> float:
        """How long a checkpoint takes: the last one's time, else its size at an assumed speed."""
        if self.last_save_seconds is not None:
            return self.last_save_seconds
        size = checkpoint_bytes(
            self.model, self.optimizer, self.is_deepspeed_enabled, trained_only=self.lora
        )
        return size.total / ASSUMED_WRITE_BYTES_PER_SECOND


def raise_save_failure(
    trainer: PMoDTrainer,
    staged: Path,
    failure: Exception | None,
    what: str,
    with_optimizer: bool = False,
) -> None:
    """A save failed on some process: remove its partial directory, then explain (a full disk
    as one line with the space needed) or re-raise (a bug)."""
    if trainer.args.should_save:
        shutil.rmtree(staged, ignore_errors=True)
        _remove_if_empty(staged.parent)
    output_dir = Path(trainer.args.output_dir)
    optimizer = trainer.optimizer if with_optimizer else None
    # a LoRA run's checkpoints (and final adapter) hold the trained weights; its merged model all
    adapter = trainer.lora and (with_optimizer or trainer.recipe.lora.save == "adapter")
    size = checkpoint_bytes(
        trainer.model,
        optimizer,
        trainer.is_deepspeed_enabled and with_optimizer,
        trained_only=adapter,
    )
    if failure is None:
        raise UserError(
            f"{what} could not be saved on another process (its error is above); the partial copy was removed"
        )
    if not is_out_of_space(failure, staged.parent, size.total):
        raise failure
    needed = human_bytes(size.total)
    if size.optimizer:
        needed += f" (weights {human_bytes(size.weights)} + optimizer state {human_bytes(size.optimizer)})"
    kept = (
        f"{trainer.published} is untouched"
        if trainer.published is not None
        else "no earlier checkpoint was saved"
    )
    raise CheckpointSpaceError(
        f"no space left on the device of {output_dir} while saving {what}: it needs about {needed}, "
        f"{human_bytes(free_bytes(output_dir))} is free. The partial copy was removed and {kept}; free some space "
        "(a checkpoint is rotated out only after the next one is complete: keep room for one more than "
        "train.save_total_limit) and continue with --resume"
    )


def publish_model(trainer: PMoDTrainer, output_dir: Path) -> None:
    """Save the final model (weights, config, processor, recipe; or a LoRA adapter directory)
    at the root of ``output_dir``.

    Files are staged, then moved in one by one: the old config.json (pmod_adapter.json) goes
    first, the new one comes last, so a directory with one always holds a whole model (adapter).
    """
    staging = output_dir / STAGING_DIR / "final"
    if trainer.args.should_save and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    failure = None
    try:
        trainer.save_model(str(staging))  # on every rank: ZeRO-3 gathers the weights
        if trainer.args.should_save:
            (staging / RECIPE_FILE).write_text(trainer.recipe_toml)
    except Exception as err:  # noqa: BLE001 - judged by raise_save_failure, on every rank together
        failure = err
    if not on_every_rank(failure is None, trainer.args.device):
        raise_save_failure(trainer, staging, failure, "the final model")
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        new_files = {path.name for path in staging.iterdir() if path.is_file()}
        saved = PEFT_WEIGHTS_FILE in new_files or any(
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
        # the files that say what the directory is (a model, an adapter) go first and come last
        markers = [name for name in ("config.json", ADAPTER_INFO_FILE) if name in new_files]
        for name in ("config.json", ADAPTER_INFO_FILE):
            (output_dir / name).unlink(missing_ok=True)
        # weights of an earlier save: sharded otherwise, or a merged model after an adapter
        stale = [*output_dir.glob("model*.safetensors*"), *(output_dir / n for n in ADAPTER_FILES)]
        for path in stale:
            if path.name not in new_files:
                path.unlink(missing_ok=True)
        for name in sorted(new_files - set(markers)) + markers:
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
        from ..progress import progress_bar

        self.progress = progress_bar("{task.fields[loss]}", stderr=False, transient=False)
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
