"""The method registry: the one ``--method`` syntax, stored records, plug-ins through entry points,
and what ``import pmod_cli`` does (and does not do) to transformers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pmod_cli.model.methods import (
    MethodError,
    TokenMethod,
    make_method,
    method_from_dict,
    method_names,
    parse_method,
    parse_methods,
)


def test_builtin_methods_are_registered_in_pipeline_order():
    assert method_names()[:5] == ("pmod", "dense", "fastv", "random", "pool")


def test_the_method_flag_help_names_every_registered_method():
    from pmod_cli.cli.options import METHOD_HELP

    listed = METHOD_HELP.split(": ", 1)[1].split(" (e.g.")[0].split(", ")
    assert sorted(listed) == sorted(method_names())


def test_one_spelling_parses_names_options_and_lists():
    methods = parse_methods(
        ["dense,fastv:layer=3,ratio=0.75;score=mean", "pool:tokens=4", "random"]
    )
    assert methods == [
        make_method("dense"),
        make_method("fastv", layer=3, ratio=0.75, score="mean"),
        make_method("pool", tokens=4),
        make_method("random"),
    ]
    assert isinstance(methods[1].layer, int) and isinstance(methods[1].ratio, float)
    # repeated and duplicated settings collapse; different settings of one method stay apart
    assert parse_methods(["pmod", "pmod,dense"]) == [make_method("pmod"), make_method("dense")]
    assert len(parse_methods(["fastv", "fastv:layer=3"])) == 2
    # a method's spec parses back to the same setting
    for method in methods:
        assert parse_method(method.spec) == method
    assert make_method("fastv", ratio=0.25).spec == "fastv:ratio=0.25"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("fastv:ratio=half", "fastv's option ratio takes float, got 'half'"),
        ("pool:tokens=4.5", "pool's option tokens takes int, got '4.5'"),
        ("fastv:K=2", "unknown option(s) K for method fastv (its options: layer, ratio, score)"),
        ("dense:layer=1", "unknown option(s) layer for method dense (its options: none)"),
        ("ratio=0.5", "option 'ratio=0.5' comes before any method"),
        ("fastv:=2", "option '=2' is not key=value"),
        ("zigzag:x=1", "unknown method 'zigzag'"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(MethodError) as error:
        parse_methods([spec])
    assert message in str(error.value)


def test_match_tflops_solves_the_knob_and_refuses_it_given():
    assert parse_methods(["fastv,pool"], match_tflops=True) == [
        make_method("fastv"),
        make_method("pool"),
    ]
    with pytest.raises(MethodError, match="chooses pool's tokens itself; drop tokens="):
        parse_methods(["pool:tokens=4"], match_tflops=True)
    with pytest.raises(MethodError, match="add one of fastv, pool(, [a-z_]+)* to --method"):
        parse_methods(["dense,random"], match_tflops=True)


def test_records_round_trip_and_the_old_flat_record_still_loads():
    for method in parse_methods(
        ["pmod,dense,fastv:layer=1,ratio=0.25,random:seed=3,pool:tokens=9"]
    ):
        assert method_from_dict(json.loads(json.dumps(method.to_dict()))) == method
    old = {"name": "fastv", "fastv_layer": 1, "fastv_ratio": 0.25, "fastv_score": "mean"}
    old.update(seed=0, pool_tokens=None)  # pmod 0.1 stored every baseline's options
    assert method_from_dict(old) == make_method("fastv", layer=1, ratio=0.25, score="mean")
    old_pool = {"name": "pool", "fastv_layer": 2, "fastv_ratio": 0.5, "fastv_score": "last"}
    old_pool.update(seed=0, pool_tokens=16)
    assert method_from_dict(old_pool) == make_method("pool", tokens=16)
    assert method_from_dict(None) == make_method("pmod")


PLUGIN = """
from dataclasses import dataclass

from pmod_cli.model.methods import TokenMethod, register_method


@register_method
@dataclass(frozen=True)
class KeepFirst(TokenMethod):
    name = "keep_first"
    title = "keep_first keeps an image's first k vision tokens after layer 1"
    k: int = 4
"""


def run_python(code: str, path: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": path, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow  # two fresh interpreters
def test_an_installed_package_adds_a_method_through_its_entry_point(tmp_path):
    (tmp_path / "pmod_keep_first.py").write_text(PLUGIN)
    dist = tmp_path / "pmod_keep_first-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pmod-keep-first\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pmod_cli.methods]\nkeep_first = pmod_keep_first\n")
    result = run_python(
        """
        from pmod_cli.model.methods import method_names, parse_method
        method = parse_method("keep_first:k=7")
        print(method_names()[-1], type(method).__name__, method.k, method.title)
        """,
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["keep_first", "KeepFirst", "7"]
    flops = subprocess.run(
        [sys.executable, "-m", "pmod_cli", "flops", "--model", "llava-1.5-7b", "--method", "keep_first:k=3", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        timeout=300,
    )  # fmt: skip
    assert flops.returncode == 0, flops.stderr
    plans = json.loads(flops.stdout)["plans"]
    assert plans[-1]["method"] == "keep_first" and plans[-1]["method_settings"]["k"] == 3


def test_a_method_registered_twice_under_one_name_is_refused():
    from pmod_cli.model.methods import register_method

    class Other(TokenMethod):
        name = "fastv"

    with pytest.raises(TypeError, match="a method named 'fastv' is already registered"):
        register_method(Other)


@pytest.mark.slow  # a fresh interpreter
def test_import_pmod_cli_leaves_transformers_alone_until_register(tmp_path):
    result = run_python(
        """
        import sys
        import pmod_cli
        assert "transformers" not in sys.modules and "torch" not in sys.modules
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        before = "pmod_llava" in CONFIG_MAPPING
        pmod_cli.register()
        print(before, "pmod_llava" in CONFIG_MAPPING, "pmod_qwen3_vl" in CONFIG_MAPPING)
        """,
        os.pathsep.join(sys.path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True"]
