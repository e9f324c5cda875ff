"""``pmod recipes``, ``pmod pretrain``, ``pmod sft``: the two training stages, run from a recipe
given by name (a recipe shipped with pmod) or by path."""

import typer

from .options import DryRun, Overrides, RecipeArg, Resume


def recipes() -> None:
    """List the recipes that run by name (pmod sft NAME), one a line."""
    from ..training.recipe import shipped_recipes

    for name in shipped_recipes():
        typer.echo(name)


def pretrain(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Resume = False,
    dry_run: DryRun = False,
) -> None:
    """Stage 1: train the connector on captions (e.g. pmod pretrain tiny_pretrain)."""
    from ..training.stages import launch

    launch("pretrain", recipe, overrides or [], resume=resume, dry_run=dry_run)


def sft(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Resume = False,
    dry_run: DryRun = False,
) -> None:
    """Stage 2: p-MoD instruction tuning of connector + LLM + routers (e.g. pmod sft tiny)."""
    from ..training.stages import launch

    launch("sft", recipe, overrides or [], resume=resume, dry_run=dry_run)
