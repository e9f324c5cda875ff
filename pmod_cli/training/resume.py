"""What ``--resume`` may change: rates and step counts yes, the model and the data no.

    check_not_finished(recipe, checkpoint)       # a finished run is not resumed
    check_same_run(recipe, checkpoint)           # UserError naming the keys that differ

A checkpoint holds the resolved recipe it was trained with (``recipe.toml``). Resuming with a
recipe that builds another model (another beta, p-MoD off, other MoD layers, another base) or
feeds other data (another file, template, max length, batch size or seed: the data position
saved in the checkpoint would point elsewhere) cannot continue that run, so it is refused,
naming the keys. Keys that only change the optimisation from here on may change: the learning
rates (the way to continue a run that diverged), the schedule, the number of steps, when to
save and log, clipping, gradient checkpointing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from .recipe import Recipe, load_recipe

RECIPE_FILE = "recipe.toml"
TRAINER_STATE_FILE = "trainer_state.json"  # the HF Trainer's, in every checkpoint

# keys that may differ on --resume (everything else changes the model or the data)
RESUMABLE_KEYS = frozenset(
    {
        "train.output_dir",
        "train.overwrite_output_dir",
        "train.max_steps",
        "train.num_epochs",
        "train.learning_rate",
        "train.connector_lr",
        "train.llm_lr",
        "train.router_lr",
        "train.vision_tower_lr",
        "train.lr_scheduler",
        "train.warmup_ratio",
        "train.weight_decay",
        "train.max_grad_norm",
        "train.gradient_checkpointing",
        "train.save_steps",
        "train.save_total_limit",
        "train.logging_steps",
        "train.dataloader_num_workers",
        "data.max_bad_fraction",
        "model.attn_implementation",
        "model.preset",
        "train.report_to",
        "train.tf32",
        "lora.save",
    }
)


def _flat(recipe: Recipe) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, values in recipe.to_dict().items()
        for key, value in values.items()
    }


def changed_keys(saved: Recipe, current: Recipe) -> dict[str, tuple[Any, Any]]:
    """{"section.key": (saved value, current value)} for every key that differs."""
    before, after = _flat(saved), _flat(current)
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


def saved_recipe(checkpoint: Path) -> Recipe | None:
    path = Path(checkpoint) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        return load_recipe(path)
    except UserError as err:
        raise UserError(
            f"--resume: cannot read the recipe {checkpoint.name} was trained with ({err})"
        ) from None


def check_same_run(recipe: Recipe, checkpoint: Path, ignore: tuple[str, ...] = ()) -> None:
    """A UserError if the recipe differs from the checkpoint's in a key that changes the model
    or the data (``ignore``: keys not comparable yet, e.g. before ``mod_layers_from`` is read)."""
    saved = saved_recipe(checkpoint)
    if saved is None:
        return
    blocked = {
        key: values
        for key, values in changed_keys(saved, recipe).items()
        if key not in RESUMABLE_KEYS
    }
    for key in ignore:
        blocked.pop(key, None)
    if not blocked:
        return
    shown = ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, (old, new) in blocked.items())
    raise UserError(
        f"--resume: the recipe differs from the one {checkpoint} was trained with in {shown}; "
        "these change the model or the data, so the run cannot continue: set them back (the checkpoint's "
        f"{RECIPE_FILE} holds them) or start a new run in another train.output_dir"
    )


def _show(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value)


def trained_steps(checkpoint: Path) -> tuple[int, int] | None:
    """(global step, max steps) the checkpoint's trainer state records, if readable."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text())
        return int(state["global_step"]), int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_not_finished(recipe: Recipe, checkpoint: Path) -> None:
    """A UserError if the checkpoint already reached the steps the recipe asks for."""
    steps = trained_steps(checkpoint)
    if steps is None:
        return
    done, planned = steps
    if recipe.train.max_steps > 0:
        target, key = recipe.train.max_steps, f"train.max_steps = {recipe.train.max_steps}"
    else:
        saved = saved_recipe(checkpoint)
        if saved is not None and saved.train.num_epochs != recipe.train.num_epochs:
            return  # more (or fewer) epochs asked for: the Trainer works out the new step count
        target, key = planned, f"train.num_epochs = {recipe.train.num_epochs:g} ({planned} steps)"
    if done < target:
        return
    output_dir = Path(checkpoint).parent
    final = (
        f"its final model is in {output_dir}"
        if (output_dir / "config.json").is_file()
        else f"{checkpoint} holds its last weights"
    )
    raise UserError(
        f"--resume: the run in {output_dir} is finished: {checkpoint.name} reached {key}; {final}. "
        "To train further, raise train.max_steps (e.g. --resume --set train.max_steps="
        f"{done * 2}); to start over, run without --resume and with --set train.overwrite_output_dir=true"
    )
