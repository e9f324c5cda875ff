"""The model-family registry, the one prompt builder and the one loader, as every command uses them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import random_image, save_checkpoint, tiny_model

import pmod_cli  # noqa: F401  (registers the p-MoD model types)
from pmod_cli import PMoDConfig, apply_pmod
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.errors import UserError
from pmod_cli.model.families import (
    FAMILIES,
    UnsupportedModelError,
    family_for_model,
    family_for_model_type,
    get_family,
    known_model_types,
)
from pmod_cli.model.loading import load_checkpoint
from pmod_cli.model.presets import read_model_shape
from pmod_cli.visualization.selection import select_tokens

LAYOUTS = {
    "llava": "llava",
    "llava_next": "next",
    "llava_onevision": "onevision",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
}  # family -> tiny_models layout


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_family_is_one_entry_every_command_reads(tmp_path, name):
    family = get_family(name)
    model, processor = tiny_model(layout=LAYOUTS[name], layers=2)
    assert family_for_model(model) is family
    apply_pmod(model, PMoDConfig(ratios=[0.5, 1.0]))
    assert family_for_model(model) is family and type(model) is family.pmod_model_class
    directory = save_checkpoint(model, processor, tmp_path / name)
    saved_type = json.loads((directory / "config.json").read_text())["model_type"]
    assert saved_type == family.pmod_model_type and family_for_model_type(saved_type) is family
    assert saved_type in known_model_types(
        pmod=True
    ) and family.dense_model_type in known_model_types(pmod=False)
    # the loader, the FLOPs shape and the patch mapping all resolve the family from the checkpoint
    loaded, loaded_processor = load_checkpoint(directory, require_pmod=True)
    assert type(loaded) is family.pmod_model_class and loaded.retention_ratios == [0.5, 1.0]
    assert read_model_shape(directory).layout == name
    image = random_image(70, 56, seed=3)
    selection = select_tokens(loaded, loaded_processor, image, "What is it?")
    assert selection.num_vision == int(selection.layers[1].kept.sum()) > 0


def test_unknown_models_and_text_models_are_refused():
    with pytest.raises(UserError, match="pmod does not know 'bert' models"):
        family_for_model_type("bert")
    model, _ = tiny_model(layout="llava", layers=2)
    model.config.text_config.model_type = "gemma"
    with pytest.raises(UnsupportedModelError, match="not 'gemma'"):
        apply_pmod(model)


def test_a_mod_layer_without_its_routing_inputs_raises():
    model, processor = tiny_model(layout="llava", layers=2)
    apply_pmod(model, PMoDConfig(ratios=[0.5, 1.0]))
    embeddings = torch.randn(1, 5, model.config.text_config.hidden_size)
    with pytest.raises(RuntimeError, match="no routing inputs"):
        model.model.language_model(inputs_embeds=embeddings)


def test_visualize_routes_the_prompt_that_eval_routes():
    """With no chat template saved, every command falls back to the family's template: the
    prompt ``pmod visualize`` routes is the one ``pmod eval`` answers."""
    from pmod_cli.evaluation.lmms_model import PMoDLmms

    model, processor = tiny_model(layout="llava", layers=2)
    apply_pmod(model, PMoDConfig(ratios=[0.5, 1.0]))
    assert processor.chat_template is None and processor.tokenizer.chat_template is None
    lm = PMoDLmms.__new__(PMoDLmms)  # only its prompt builder: no lmms-eval run needed here
    lm.processor, lm.fallback_template = processor, "vicuna_v1"
    eval_prompt = lm.build_prompt("Describe the image.", 1)
    assert eval_prompt.startswith("A chat between") and eval_prompt.endswith("ASSISTANT:")
    image = random_image(56, 56, seed=1)
    routed = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: routed.append(kwargs["input_ids"]), with_kwargs=True
    )
    select_tokens(model, processor, image, "Describe the image.")
    hook.remove()
    expected = encode(
        processor, [build_prompt(processor, "Describe the image.", 1)], [image], model
    )["input_ids"]
    assert torch.equal(routed[0], expected)
    assert torch.equal(expected, encode(processor, [eval_prompt], [image], model)["input_ids"])


def test_the_shared_token_geometry_loads_without_torch():
    """``families/geometry.py`` is arithmetic on sizes: the module, loaded on its own in a fresh
    interpreter, imports neither torch nor transformers (the package's ``__init__`` loads the model
    code, so the module is loaded from its file) and places a padded crop's patches."""
    from pmod_cli.model.families import geometry

    code = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pmod_cli.model.families.geometry", sys.argv[1])
geometry = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = geometry
spec.loader.exec_module(geometry)
chain = geometry.resize_crop(40, 80, size={"shortest_edge": 28}, crop_size=None, pad_to_square=True)
box = geometry.grid_box(chain, geometry.IMAGE_VIEW, 0, 0, 14)
print(box.x0, box.y0, box.x1, box.y1, geometry.capped_map_size(16, 16, 4, 9))
print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""
    result = subprocess.run(
        [sys.executable, "-c", code, geometry.__file__], capture_output=True, text=True, check=True
    )
    # an 80 x 40 image padded to 80 x 80 (20 rows above), resized to 28: a patch is 40 px
    assert result.stdout.splitlines() == ["0.0 -20.0 40.0 20.0 (12, 12)", "[]"]
