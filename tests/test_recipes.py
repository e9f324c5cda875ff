"""Recipes: parsing, overrides, errors (one line, exit 2) and the --dry-run plan of real-size recipes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from pmod_cli import cli  # noqa: E402
from pmod_cli.errors import UserError  # noqa: E402
from pmod_cli.training.plan import make_training_plan  # noqa: E402
from pmod_cli.training.recipe import load_recipe, parse_override, recipe_from_dict  # noqa: E402

RECIPES = ROOT / "recipes"
SHIPPED = [
    "llava_1_5_pretrain.toml",
    "llava_1_5.toml",
    "llava_next_pretrain.toml",
    "llava_next.toml",
    "tiny_pretrain.toml",
    "tiny.toml",
    "gamma_llava_1_5.toml",
    "gamma_tiny.toml",
    "llava_onevision.toml",
    "llava_onevision_tiny_pretrain.toml",
    "llava_onevision_tiny.toml",
    "qwen2_5_vl.toml",
    "qwen2_5_vl_tiny.toml",
    "qwen3_vl.toml",
    "qwen3_vl_tiny.toml",
]


def minimal(**sections):
    values = {
        "model": {"checkpoint": "tiny:base"},
        "data": {"path": "x.json"},
        "train": {"output_dir": "out"},
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    return values


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_parse_and_round_trip(name, tmp_path):
    recipe = load_recipe(RECIPES / name)
    # the resolved TOML written into checkpoints reads back to the same recipe
    resolved = tmp_path / "recipe.toml"
    resolved.write_text(recipe.to_toml())
    again = load_recipe(resolved)
    assert again.to_dict() == recipe.to_dict()


def test_paper_settings():
    """Table 7 and the released scripts, as the recipes hold them."""
    for stage_1 in ("llava_1_5_pretrain.toml", "llava_next_pretrain.toml"):
        recipe = load_recipe(RECIPES / stage_1)
        assert (recipe.train.learning_rate, recipe.train.global_batch_size) == (1e-3, 256)
        assert recipe.data.template == "plain" and not recipe.pmod.enabled
    for stage_2 in ("llava_1_5.toml", "llava_next.toml"):
        recipe = load_recipe(RECIPES / stage_2)
        model, train = recipe.model, recipe.train
        assert (
            model.llm == "lmsys/vicuna-7b-v1.5"
            and model.vision_tower == "openai/clip-vit-large-patch14-336"
        )
        assert (
            model.vision_feature_layer,
            model.vision_feature_select_strategy,
            model.connector,
        ) == (
            -2,
            "default",
            "mlp2x_gelu",
        )
        assert (train.learning_rate, train.global_batch_size, train.num_epochs) == (2e-5, 128, 1.0)
        assert (train.lr_scheduler, train.warmup_ratio, train.weight_decay) == ("cosine", 0.03, 0.0)
        assert train.gradient_checkpointing and not train.tune_vision_tower
        assert (
            recipe.pmod.enabled
            and recipe.pmod.config.beta == 0.5
            and recipe.data.template == "vicuna_v1"
        )
    v15, next_ = load_recipe(RECIPES / "llava_1_5.toml"), load_recipe(RECIPES / "llava_next.toml")
    assert (v15.data.max_length, v15.train.deepspeed, v15.data.image_aspect_ratio) == (
        2048,
        "zero2",
        "pad",
    )
    assert (next_.data.max_length, next_.train.deepspeed, next_.data.image_aspect_ratio) == (
        4096,
        "zero3",
        "anyres",
    )
    grids = {(h // 336, w // 336) for h, w in next_.model.image_grid_pinpoints}
    assert grids == {(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)}


def test_overrides_are_toml_values():
    assert parse_override("train.max_steps=20") == ("train", "max_steps", 20)
    assert parse_override("pmod.beta=0.4") == ("pmod", "beta", 0.4)
    assert parse_override("pmod.enabled=false") == ("pmod", "enabled", False)
    assert parse_override("pmod.ratios=[1, 0.5]") == ("pmod", "ratios", [1, 0.5])
    assert parse_override("data.path=my/file.json") == ("data", "path", "my/file.json")
    recipe = load_recipe(
        RECIPES / "tiny.toml", ["train.max_steps=7", "pmod.beta=0.4", "train.learning_rate=1"]
    )
    assert recipe.train.max_steps == 7 and recipe.pmod.config.beta == 0.4
    assert recipe.train.learning_rate == 1.0 and isinstance(recipe.train.learning_rate, float)
    # a string key keeps the text as written; a number key still needs a number
    recipe = load_recipe(
        RECIPES / "tiny.toml", ["train.output_dir=2024", "data.path=true", "pmod.schedule=linear"]
    )
    assert recipe.train.output_dir == "2024" and recipe.data.path == "true"
    with pytest.raises(UserError, match="train.seed"):
        load_recipe(RECIPES / "tiny.toml", ["train.seed=abc"])
    # num_epochs does not matter when max_steps is set
    assert load_recipe(RECIPES / "tiny.toml", ["train.num_epochs=0"]).train.max_steps == 300


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (minimal(train={"max_stepz": 3}), "train.max_stepz"),
        (minimal(pmod={"betta": 0.4}), "pmod.betta"),
        (minimal(train={"max_steps": "ten"}), "train.max_steps"),
        (minimal(train={"max_steps": 2.5}), "train.max_steps"),
        (minimal(pmod={"enabled": 1}), "pmod.enabled"),
        (minimal(pmod={"beta": "high"}), "pmod.beta"),
        (minimal(pmod={"schedule": "zigzag"}), "zigzag"),
        (minimal(data={"template": "alpaca"}), "data.template"),
        (minimal(train={"deepspeed": "zero9"}), "train.deepspeed"),
        (
            minimal(train={"global_batch_size": 10, "per_device_batch_size": 4}),
            "train.global_batch_size",
        ),
        ({**minimal(), "optimizer": {}}, "[optimizer]"),
        (minimal(pmod={"ratios": [1.0, 1.5]}), "pmod.ratios"),
        (minimal(pmod={"mod_layers": [-1, 3]}), "pmod.mod_layers"),
        (minimal(train={"save_total_limit": -1}), "train.save_total_limit"),
        (minimal(train={"dataloader_num_workers": -2}), "train.dataloader_num_workers"),
        (minimal(train={"num_epochs": 0}), "train.num_epochs"),
        ({"data": {"path": "x.json"}, "train": {"output_dir": "o"}}, "model.checkpoint"),
    ],
)
def test_recipe_errors_name_the_key(values, named):
    with pytest.raises(UserError, match=named.replace("[", r"\[").replace(".", r"\.")):
        recipe_from_dict(values)


def run_cli(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["pmod", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["sft", "recipes/tiny.toml", "--set", "train.bogus=1"], "train.bogus"),
        (["sft", "recipes/tiny.toml", "--set", "pmod.beta=yes"], "pmod.beta"),
        (["pretrain", "recipes/no_such_recipe.toml"], "no_such_recipe.toml"),
        (["sft", "tiny", "--set", "train.bogus=1"], "train.bogus"),  # by name
        (["sft", "recipes/tiny.toml", "--set", "maxsteps"], "section.key=value"),
        (
            ["sft", "recipes/tiny.toml", "--dry-run", "--set", "data.path=tiny:shpes/x.json"],
            "tiny:shpes/x.json",
        ),
        (
            ["sft", "recipes/tiny.toml", "--dry-run", "--set", "pmod.ratios=[1, 0.5]"],
            "[pmod]: pmod.ratios",
        ),
        (
            ["sft", "recipes/tiny.toml", "--dry-run", "--set", "pmod.mod_layers=[2, 9]"],
            "[pmod]: pmod.mod_layers",
        ),
        # a dry run with missing data still plans, then exits 2 as the real run would stop
        (
            [
                "sft",
                "recipes/tiny.toml",
                "--dry-run",
                "--set",
                "data.path=missing/data.json",
                "--set",
                "data.image_folder=",
            ],
            "missing/data.json not found",
        ),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(monkeypatch, capsys, argv, named):
    monkeypatch.chdir(ROOT)
    code, captured = run_cli(monkeypatch, capsys, *argv)
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]
    if "data.path=missing/data.json" in argv:
        assert "plan for recipes/tiny.toml" in captured.out


def test_dry_run_plans_real_recipes_without_download():
    sft = make_training_plan("sft", load_recipe(RECIPES / "llava_1_5.toml"))
    assert "preset llava-1.5-7b" in sft.model_source
    # PRD at beta 0.5 on 32 layers: dense 0-7, MoD 8-31, one Linear(4096, 1) router per MoD layer
    assert [r < 1 for r in sft.retention_ratios] == [False] * 8 + [True] * 24
    assert sft.parameters["router"] == (24 * 4097, 24 * 4097)
    assert sft.parameters["vision_tower"][0] == 0 and sft.parameters["vision_tower"][1] > 3e8
    assert sft.parameters["llm"][0] == sft.parameters["llm"][1] > 6.5e9
    assert (
        round(sft.flops.baseline_tflops, 2) == 8.38
        and sft.flops.tflops < 0.6 * sft.flops.baseline_tflops
    )
    assert not sft.data.found and "not found" in sft.data.problem

    pretrain = make_training_plan("pretrain", load_recipe(RECIPES / "llava_next_pretrain.toml"))
    trainable = {part for part, (count, _) in pretrain.parameters.items() if count}
    assert trainable == {"connector"} and pretrain.retention_ratios == [1.0] * 32

    next_ = make_training_plan("sft", load_recipe(RECIPES / "llava_next.toml"))
    assert next_.shape.vision_tokens == 2928 and round(next_.flops.baseline_tflops, 2) == 39.46
    assert next_.accumulation * next_.world_size * 4 == 128

    # gamma-MoD: one shared router; the system prompt competes with the image, and the plan's
    # count is the one `pmod flops` gives for the same options
    gamma = make_training_plan("sft", load_recipe(RECIPES / "gamma_llava_1_5.toml"))
    assert gamma.parameters["router"][0] == 4097
    assert gamma.flops.routed_tokens == "all" and gamma.flops.competing_tokens == 576 + 35
    assert [row.kind for row in gamma.flops.layers] == ["dense"] * 3 + ["MoD"] * 28 + ["dense"]
    assert gamma.flops.layers[3].tokens == (58 - 35) + (576 + 35) // 2


def test_dry_run_plans_the_onevision_recipe_from_its_preset():
    plan = make_training_plan("sft", load_recipe(RECIPES / "llava_onevision.toml"))
    assert (
        "preset llava-onevision-qwen2-7b" in plan.model_source
        and plan.shape.layout == "llava_onevision"
    )
    # PRD at beta 0.5 on Qwen2-7B's 28 layers: dense 0-6, MoD 7-27, one Linear(3584, 1) router each
    assert [r < 1 for r in plan.retention_ratios] == [False] * 7 + [True] * 21
    assert plan.parameters["router"] == (21 * 3585, 21 * 3585)
    assert plan.parameters["vision_tower"][0] == 0 and plan.parameters["connector"][0] > 0
    # the largest anyres_max_9 layout (a 5 x 2 grid): 729 base + 135 rows of 54 features and a newline
    assert (
        plan.flops.vision_tokens == 729 + 135 * 55
        and plan.flops.tflops < 0.6 * plan.flops.baseline_tflops
    )
    assert not plan.data.found


def test_onevision_recipes_name_their_family_and_budget():
    sft = load_recipe(RECIPES / "llava_onevision_tiny.toml")
    assert sft.model.layout == "llava_onevision" and sft.data.image_aspect_ratio == "anyres_max_9"
    assert sft.data.video_frames == 8 and sft.pmod.config.budget == "sample"
    with pytest.raises(UserError, match="takes data.image_aspect_ratio = 'anyres_max_9'"):
        load_recipe(RECIPES / "llava_onevision_tiny.toml", ["data.image_aspect_ratio=anyres"])
    with pytest.raises(UserError, match="data.video_frames must be positive"):
        load_recipe(RECIPES / "llava_onevision_tiny.toml", ["data.video_frames=0"])
    with pytest.raises(
        UserError, match=r"\[pmod\]: unknown budget .frame.; choose one of sample, image"
    ):
        load_recipe(RECIPES / "llava_onevision_tiny.toml", ["pmod.budget=frame"])


def test_dry_run_checks_every_sample_of_the_tiny_set():
    plan = make_training_plan("sft", load_recipe(RECIPES / "tiny.toml"))
    assert plan.data.found and plan.data.total == plan.data.usable > 1000 and not plan.data.bad
    assert "parts" in plan.model_source and plan.parameters["router"][0] > 0


# ---- recipes by name: shipped as package data (pmod_cli/recipes links to recipes/) ----------

SHIPPED_NAMES = sorted(path.stem for path in RECIPES.glob("*.toml"))


@pytest.mark.parametrize("name", ["llava_next", "llava_next.toml", "tiny_pretrain"])
def test_a_shipped_recipe_runs_by_name_as_by_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the name finds the file shipped with pmod
    path = RECIPES / f"{name.removesuffix('.toml')}.toml"
    by_name = load_recipe(name, ["train.max_steps=3"])
    assert by_name.to_dict() == load_recipe(path, ["train.max_steps=3"]).to_dict()
    assert Path(by_name.source).read_bytes() == path.read_bytes()


def test_a_file_comes_before_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text(
        '[model]\ncheckpoint = "tiny:base"\n[data]\npath = "x.json"\n[train]\noutput_dir = "mine"\n'
    )
    assert load_recipe("tiny").train.output_dir == "mine"
    assert load_recipe("tiny.toml").train.output_dir == "runs/tiny/sft"


def test_an_unknown_recipe_name_lists_the_shipped_ones(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, captured = run_cli(monkeypatch, capsys, "sft", "llava_nxt")
    assert code == 2 and captured.out == ""
    assert captured.err.splitlines() == [
        "error: recipe llava_nxt is neither a file nor a recipe shipped with pmod; pass a TOML "
        f"file or one of: {', '.join(SHIPPED_NAMES)}"
    ]


def test_pmod_recipes_lists_the_shipped_names(monkeypatch, capsys):
    code, captured = run_cli(monkeypatch, capsys, "recipes")
    assert code == 0 and captured.out.split() == SHIPPED_NAMES


def test_the_wheel_ships_the_recipes_and_the_command(tmp_path):
    """Built from a copy of the checkout (no build/ left in it), without the network."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "pmod_cli", source / "pmod_cli", symlinks=True, ignore=ignore)
    shutil.copytree(RECIPES, source / "recipes")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = (tmp_path / "dist").glob("pmod_cli-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(name for name in names if name.endswith("entry_points.txt"))
        assert "pmod = pmod_cli.cli:main" in archive.read(entry_points).decode()
        assert archive.read("pmod_cli/recipes/tiny.toml") == (RECIPES / "tiny.toml").read_bytes()
    shipped = sorted(name for name in names if name.startswith("pmod_cli/recipes/"))
    assert shipped == [f"pmod_cli/recipes/{name}.toml" for name in SHIPPED_NAMES]
    assert {"pmod_cli/cli/__init__.py", "pmod_cli/cli/__main__.py"} <= set(names)
