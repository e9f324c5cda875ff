"""Checks the token-method tests share: kept masks from a routing record, a layer's eager attention
rows, captured layer inputs, generation under the three attention backends, ``pmod eval`` of
several methods side by side."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from flash_attn_cpu import install as install_flash
from typer.testing import CliRunner

from pmod_cli import apply_method, record_routing
from pmod_cli.cli import app, main
from pmod_cli.model.families import family_for_model


def vision_of(model, inputs) -> torch.Tensor:
    return family_for_model(model).vision_mask(inputs["input_ids"], model.config)


def method_model(builder, spec: str, **options):
    """A tiny model from ``builder(**options)`` with the method ``spec`` applied, in eval mode."""
    model, processor = builder(**options)
    apply_method(model, spec)
    return model.eval(), processor


def kept_masks(model, inputs, **kwargs) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    with torch.no_grad(), record_routing(model) as routing:
        logits = model(**inputs, **kwargs).logits
    return logits, {layer: d.keep_mask for layer, d in routing.layers.items()}


def eager_row_attention(layer, states, cos, sin, rows) -> torch.Tensor:
    """(tokens,) the attention each token of a compacted sequence gets from ``rows`` in
    ``layer``: HF's own eager attention module over that sequence (causal), its probabilities
    averaged over heads and over the rows."""
    length = states.shape[1]
    causal = torch.full((length, length), torch.finfo(states.dtype).min).triu(1)[None, None]
    _, probs = layer.self_attn(
        hidden_states=layer.input_layernorm(states),
        position_embeddings=(cos, sin),
        attention_mask=causal,
    )
    return probs[0].mean(dim=0)[rows].mean(dim=0)


def capture_layer_inputs(model, layers) -> tuple[dict, list]:
    captured = {}

    def hook(index, module, args, kwargs):
        states = args[0] if args else kwargs["hidden_states"]
        captured[index] = (states.detach().clone(), kwargs["position_embeddings"])

    hooks = [
        model.decoder_layers[index].register_forward_pre_hook(
            lambda m, a, k, index=index: hook(index, m, a, k), with_kwargs=True
        )
        for index in layers
    ]
    return captured, hooks


GREEDY = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)


def generate(model, inputs, **options):
    suppressed = [model.config.image_token_id]  # a random model never generates a vision token
    with torch.no_grad():
        return model.generate(**inputs, suppress_tokens=suppressed, **GREEDY, **options)


def assert_same_generation(a, b, atol=1e-4):
    assert torch.equal(a.sequences, b.sequences)
    for step_a, step_b in zip(a.logits, b.logits, strict=True):
        assert torch.allclose(step_a, step_b, atol=atol)


def backends(model, monkeypatch):
    """The eager model and copies of it under sdpa and flash-attention 2 (the CPU stand-in)."""
    install_flash(monkeypatch)
    copies = {"eager": model}
    for backend in ("sdpa", "flash_attention_2"):
        copies[backend] = copy.deepcopy(model)
        copies[backend].set_attn_implementation(backend)
    return copies


def assert_backends_keep_alike(model, inputs, monkeypatch) -> None:
    """The eager model and its sdpa and flash-attention 2 copies keep the same tokens in every
    layer and give the same logits on the real rows (padding rows differ by design under
    flash-attention, which attends nowhere there)."""
    real = inputs["attention_mask"].bool()
    runs = {name: kept_masks(other, inputs) for name, other in backends(model, monkeypatch).items()}
    reference_logits, reference_kept = runs.pop("eager")
    for backend, (logits, kept) in runs.items():
        assert kept.keys() == reference_kept.keys()
        assert all(torch.equal(kept[layer], reference_kept[layer]) for layer in kept), backend
        assert torch.allclose(logits[real], reference_logits[real], atol=1e-4), backend


def assert_cached_uncached_and_alone_agree(model, inputs, alone_inputs) -> object:
    """Cached generation equals uncached, and each sample alone (``alone_inputs(i)``) equals its
    row of the padded batch; the cached run's output."""
    assert inputs["attention_mask"].min() == 0  # a padded batch
    cached = generate(model, inputs, use_cache=True)
    assert_same_generation(cached, generate(model, inputs, use_cache=False))
    new_tokens = GREEDY["max_new_tokens"]
    for row in range(inputs["input_ids"].shape[0]):
        alone = generate(model, alone_inputs(row))
        assert torch.equal(alone.sequences[0, -new_tokens:], cached.sequences[row, -new_tokens:])
        for step_alone, step_batched in zip(alone.logits, cached.logits, strict=True):
            assert torch.allclose(step_alone[0], step_batched[row], atol=1e-4)
    return cached


def cli_refusal(monkeypatch, capsys, *args: str) -> str:
    """``pmod ARGS`` ends with exit code 2 and one line starting ``error: ``; that line."""
    capsys.readouterr()  # what came before (a save's progress bar)
    monkeypatch.setattr("sys.argv", ["pmod", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def flops_refusal(monkeypatch, capsys, spec: str) -> str:
    """``pmod flops --model llava-1.5-7b --method SPEC`` is refused; its one line."""
    return cli_refusal(monkeypatch, capsys, "flops", "--model", "llava-1.5-7b", "--method", spec)


def eval_side_by_side(checkpoint, output, methods: str, *extra: str) -> tuple[dict[str, dict], str]:
    """``pmod eval CHECKPOINT --method METHODS`` on four tiny questions (batch 2, CPU) succeeds;
    each method's run in ``output`` by name, in the order given, and what the command printed."""
    result = CliRunner().invoke(
        app,
        ["eval", str(checkpoint), "--tasks", "pmod_tiny_vqa", "--limit", "4", "--batch-size", "2",
         "--device", "cpu", "--method", methods, "--output", str(output), *extra],
        terminal_width=250,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    runs = json.loads(output.read_text())["checkpoints"]
    return {run["method"]["name"]: run for run in runs}, result.output
