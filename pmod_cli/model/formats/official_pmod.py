"""The released p-MoD checkpoints (``pmod_llava_llama``, MCG-NJU/p-MoD) translated to pmod.

They are original LLaVA checkpoints (see ``original_llava``) whose MoD layers wrap the decoder
layer: ``model.layers.{i}.decoder_layer.*`` holds the layer, ``model.layers.{i}.router.router.*``
its ``Linear(hidden, 1)`` router. The config says which layers are MoD and how:

- ``mod_target_layers``: ``shiftedcos_decay_MAX_MIN`` / ``shiftedlinear_decay_MAX_MIN`` (the
  decay with the code's fixed 31: ``cosine31`` / ``linear31``, thresholds MAX and MIN), or
  ``interleave`` / ``deep_all`` / ``deep_all_include_last`` (fixed layers at ratio beta);
- ``mod_router_factor``: beta (or that fixed ratio);
- ``mod_weight_norm``: ``NAME_SCALE_BIAS`` meaning w = SCALE * NAME(r) + BIAS (``tanh_0.2_1`` is
  TanhNorm with alpha 0.2), or a bare NAME meaning SCALE = BIAS = 1;
- ``mod_target_token_type``: which tokens compete (``vision_all`` in the training scripts).

The translation sets the released code's selection rule (rank the normalised weights with
torch.topk), so a released checkpoint keeps, in any precision, the tokens it kept when it was
evaluated. What the code does and pmod cannot (a norm bias other than 1, text tokens competing)
is refused in one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ...errors import UserError
from ..config import PMoDConfig

DECAY_SCHEDULES = {"shiftedcos": "cosine31", "shiftedlinear": "linear31"}
FIXED_MODES = ("interleave", "deep_all", "deep_all_include_last")
_DECAY = re.compile(r"^([a-z]+)_decay_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)$")
_NORM = re.compile(r"^([a-z]+)_(\d+(?:\.\d+)?)_(-?\d+(?:\.\d+)?)$")
_WRAPPED = re.compile(r"^model\.layers\.(\d+)\.decoder_layer\.(.+)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.router\.router\.(weight|bias)$")


def is_official_pmod(values: dict[str, Any]) -> bool:
    """A released-code checkpoint with MoD layers (its dense runs carry no ``mod_target_layers``)."""
    return values.get("mod_target_layers") is not None


def pmod_config(values: dict[str, Any], layout: str, where: Path) -> PMoDConfig:
    """The ``PMoDConfig`` that computes what the released code computes with these settings."""
    schedule, beta, min_ratio, max_ratio = _schedule(values, where)
    weight_norm, alpha, shift = _weight_norm(values.get("mod_weight_norm", "tanh_0.2_1"), where)
    _check_token_type(values.get("mod_target_token_type", "vision_hr"), layout, where)
    try:
        return PMoDConfig(
            schedule=schedule,
            beta=beta,
            min_ratio=min_ratio,
            max_ratio=max_ratio,
            weight_norm=weight_norm,
            alpha=alpha,
            softmax_shift=shift,
            string=True,  # a skipped vision token becomes w * x
            reweight="mlp",  # x + attn + w * mlp
            router_input="hidden",
            routed_tokens="vision",
            selection="weight",
        )
    except ValueError as err:
        raise UserError(f"{where}: the p-MoD settings give no valid schedule: {err}") from None


def _schedule(values: dict[str, Any], where: Path) -> tuple[str, float, float, float]:
    """(schedule, beta, min_ratio, max_ratio) of ``mod_target_layers`` and ``mod_router_factor``."""
    target = values.get("mod_target_layers")
    beta = values.get("mod_router_factor")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool):
        raise UserError(f"{where}: mod_router_factor is {beta!r}; expected a number")
    match = _DECAY.match(str(target))
    if match and match.group(1) in DECAY_SCHEDULES:
        return (
            DECAY_SCHEDULES[match.group(1)],
            float(beta),
            float(match.group(3)),
            float(match.group(2)),
        )
    if target in FIXED_MODES:
        if not 0.0 < beta < 1.0:
            raise UserError(
                f"{where}: {target} with mod_router_factor {beta}; pmod needs a ratio between 0 and 1"
            )
        # ratio = beta exactly: widen the thresholds so that they never move it
        return target, float(beta), min(0.15, float(beta)), max(0.85, float(beta))
    raise UserError(
        f"{where}: unknown mod_target_layers {target!r}; the released code has "
        f"shiftedcos_decay_MAX_MIN, shiftedlinear_decay_MAX_MIN, {', '.join(FIXED_MODES)}"
    )


def _weight_norm(spec: Any, where: Path) -> tuple[str, float, float | None]:
    """(weight_norm, alpha, softmax_shift) of ``mod_weight_norm`` (w = scale * norm(r) + bias)."""
    match = _NORM.match(str(spec))
    name, scale, bias = (
        (match.group(1), float(match.group(2)), float(match.group(3)))
        if match
        else (str(spec), 1.0, 1.0)
    )
    if name == "softmax" and bias != 1.0:
        return "shifted_softmax", scale, bias - 1.0
    if name in ("tanh", "sigmoid", "softmax") and bias == 1.0:
        return name, scale, None
    if name == "none" and scale == 1.0 and bias == 1.0:
        return "none", 0.2, None
    raise UserError(
        f"{where}: mod_weight_norm {spec!r} has no pmod equivalent (pmod weighs w = 1 + alpha f(r))"
    )


def _check_token_type(token_type: Any, layout: str, where: Path) -> None:
    # LLaVA-1.5's code marks every image token as competing whatever the type says
    if token_type == "vision_all" or (token_type == "vision_hr" and layout == "llava"):
        return
    if token_type == "vision_hr":
        raise UserError(
            f"{where}: mod_target_token_type 'vision_hr' routes only the high-resolution tokens of an anyres "
            "image; pmod routes all vision tokens (vision_all, as the released training scripts do)"
        )
    raise UserError(
        f"{where}: mod_target_token_type {token_type!r} is not supported; pmod routes vision tokens (vision_all)"
    )


def unwrap_mod_layers(
    weights: dict[str, torch.Tensor], bias_enabled: bool, where: Path
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """(the weights with MoD layers under plain layer names, {layer: router weight and bias})."""
    plain, routers = {}, {}
    for name, tensor in weights.items():
        router = _ROUTER.match(name)
        if router:
            routers.setdefault(int(router.group(1)), {})[router.group(2)] = tensor
            continue
        wrapped = _WRAPPED.match(name)
        plain[f"model.layers.{wrapped.group(1)}.{wrapped.group(2)}" if wrapped else name] = tensor
    for layer, router in routers.items():
        if "weight" not in router:
            raise UserError(f"{where}: the router of layer {layer} has no weight")
        if "bias" not in router:
            if bias_enabled:
                raise UserError(
                    f"{where}: the router of layer {layer} has no bias, but mod_bias_enabled is set"
                )
            router["bias"] = torch.zeros(
                1, dtype=router["weight"].dtype
            )  # a bias-free router adds 0
    return plain, routers


def check_router_layers(
    routers: dict[int, Any], pmod: PMoDConfig, num_layers: int, where: Path
) -> None:
    """The checkpoint's routers sit exactly in the MoD layers its settings give."""
    planned = [i for i, ratio in enumerate(pmod.retention_ratios(num_layers)) if ratio < 1.0]
    if sorted(routers) != planned:
        raise UserError(
            f"{where} holds routers in layers {sorted(routers)}, but its settings make layers {planned} MoD"
        )
