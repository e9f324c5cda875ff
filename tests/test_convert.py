"""`pmod convert` and the shared checkpoint loader."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_model_core import batch_inputs
from tiny_models import tiny_model

from pmod_cli.errors import UserError
from pmod_cli.model.loading import load_checkpoint

PMOD = [sys.executable, "-m", "pmod_cli.cli"]


@pytest.mark.slow
def test_convert_writes_a_pmod_checkpoint_that_computes_like_the_original(tmp_path):
    model, processor = tiny_model("qwen2", "llava_next")
    model.save_pretrained(tmp_path / "dense")
    processor.save_pretrained(tmp_path / "dense")
    result = subprocess.run(
        PMOD + ["convert", str(tmp_path / "dense"), str(tmp_path / "pmod"), "--beta", "2.0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "0 of 4 layers are MoD" in result.stdout
    converted, converted_processor = load_checkpoint(tmp_path / "pmod")
    assert converted.config.model_type == "pmod_llava_next"
    inputs = batch_inputs(converted_processor)
    with torch.no_grad():
        assert torch.equal(converted(**inputs).logits, model(**inputs).logits)


@pytest.mark.slow
def test_convert_refuses_bad_input_in_one_line(tmp_path):
    cases = [
        (
            ["convert", str(tmp_path / "missing"), str(tmp_path / "out")],
            "checkpoint directory not found",
        ),
        (["convert", str(tmp_path), str(tmp_path / "out"), "--beta", "-1"], "beta must be >= 0"),
    ]
    for args, message in cases:
        result = subprocess.run(PMOD + args, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_loader_names_what_is_wrong(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="'bert' model"):
        load_checkpoint(tmp_path)
