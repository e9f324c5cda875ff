"""The gamma-MoD recipes: the published LLaVA-1.5 setting, and the tiny variant trained end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from pmod_cli.errors import UserError  # noqa: E402
from pmod_cli.model import is_pmod_model, mod_layer_indices  # noqa: E402
from pmod_cli.training.recipe import load_recipe  # noqa: E402
from pmod_cli.training.stages import sft  # noqa: E402

RECIPES = ROOT / "recipes"


def test_gamma_llava_1_5_is_the_published_setting(tmp_path):
    recipe = load_recipe(RECIPES / "gamma_llava_1_5.toml")
    config = recipe.pmod.config
    assert recipe.pmod.enabled and config.shared_router and config.masked_routing
    assert (config.routed_tokens, config.router_input, config.inference_routing) == (
        "all",
        "normed",
        "threshold",
    )
    assert config.aux_loss_coef == 0.01 and config.routing_threshold == 0.5
    # the released code: layers 0, 1, 2 and 31 dense, every other layer skips half its competing tokens
    ratios = config.retention_ratios(32)
    assert [layer for layer, ratio in enumerate(ratios) if ratio == 1.0] == [0, 1, 2, 31]
    assert {ratio for ratio in ratios if ratio < 1.0} == {0.5}
    # same data and optimisation as the p-MoD LLaVA-1.5 recipe
    pmod = load_recipe(RECIPES / "llava_1_5.toml")
    assert recipe.data == pmod.data and recipe.model == pmod.model
    assert recipe.train.learning_rate == pmod.train.learning_rate == 2e-5
    resolved = tmp_path / "recipe.toml"
    resolved.write_text(recipe.to_toml())
    assert load_recipe(resolved).to_dict() == recipe.to_dict()


@pytest.mark.slow
def test_gamma_tiny_trains_end_to_end(tmp_path):
    output = tmp_path / "gamma_sft"
    recipe = load_recipe(
        RECIPES / "gamma_tiny.toml",
        [
            f"train.output_dir={output}",
            "model.pretrained_connector=",  # no pretrain stage here: a fresh connector
            "train.max_steps=3",
            "train.global_batch_size=4",
            "train.per_device_batch_size=4",
            "train.logging_steps=1",
        ],
    )
    result = sft(recipe)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)

    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output)
    assert is_pmod_model(model) and model.pmod_config == recipe.pmod.config
    assert mod_layer_indices(model) == [0, 3, 4, 5]
    # one router for all MoD layers, and training moved it off its zero initialisation
    routers = {name: p for name, p in model.named_parameters() if "router" in name}
    assert sorted(routers) == [
        "model.language_model.pmod_shared_router.bias",
        "model.language_model.pmod_shared_router.weight",
    ]
    assert routers["model.language_model.pmod_shared_router.weight"].abs().sum() > 0

    # the trained checkpoint answers under threshold routing
    from PIL import Image

    from pmod_cli.data.prompts import build_prompt

    image = Image.new("RGB", (112, 112), "red")
    inputs = processor(
        text=[build_prompt(processor, "What colour is the square?")],
        images=[image],
        return_tensors="pt",
    )
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_recipe_takes_its_mod_layers_from_an_arank_result_file(tmp_path):
    from pmod_cli.analysis.arank import ARankResult
    from pmod_cli.training.plan import make_training_plan

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    result = tmp_path / "arank.json"
    # 6 layers (the tiny LLM); ARank proposes MoD in layers 1, 3, 5
    ARankResult(
        model="tiny",
        samples=4,
        arank=[9.0, 2.0, 8.0, 1.0, 7.0, 3.0],
        dense_layers=[0, 2, 4],
        mod_layers=[1, 3, 5],
    ).save(result)
    overrides = [f"pmod.mod_layers_from={result}", "pmod.schedule=constant", "pmod.beta=0.5"]
    recipe = load_recipe(recipes / "tiny.toml", overrides)
    plan = make_training_plan("sft", recipe)
    assert plan.retention_ratios == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5]
    # the resolved recipe (saved with every checkpoint) names the layers, not the file
    assert (
        "mod_layers = [1, 3, 5]" in recipe.to_toml() and "mod_layers_from" not in recipe.to_toml()
    )

    with pytest.raises(UserError, match="not both"):
        load_recipe(recipes / "tiny.toml", [*overrides, "pmod.mod_layers=[1]"])
    wrong_size = tmp_path / "arank8.json"
    ARankResult(
        model="other", samples=4, arank=[1.0] * 8, dense_layers=[0], mod_layers=list(range(1, 8))
    ).save(wrong_size)
    with pytest.raises(UserError, match="8-layer model but this model has 6 layers"):
        make_training_plan(
            "sft", load_recipe(recipes / "tiny.toml", [f"pmod.mod_layers_from={wrong_size}"])
        )
