"""Training: recipes, the model a recipe describes, and the pretrain / sft stages on the HF Trainer.

from pmod_cli.training import load_recipe, pretrain, sft
result = sft(load_recipe("recipes/tiny.toml", ["train.max_steps=20"]))
"""

from .recipe import Recipe, load_recipe
from .stages import StageResult, pretrain, sft

__all__ = ["Recipe", "StageResult", "load_recipe", "pretrain", "sft"]
