"""The ways the demo can run a request: the method selector is fed by ``DEMO_METHODS``.

A method turns the loaded p-MoD model into the model that answers for it. It must not change the
loaded model (other methods and later requests use it) and should share its weights rather than
copy them (a 7B model twice does not fit many GPUs): ``shared_weights_copy`` gives a second model
object over the same parameter tensors, whose layers and config a method may then change.

The dense twin is the checkpoint's own weights with every decoder layer dense: the shared copy
re-planned with ratio 1 in every layer (``apply_pmod``), which runs the untouched HF layer forward
and drops the copy's routers. The training-free baselines (``apply_method``) run on a shared copy
too; they are offered only when asked for (``--method pmod,dense,fastv,random``).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..model import apply_method, apply_pmod


@dataclass(frozen=True)
class DemoMethod:
    """One entry of the "run as" switch."""

    name: str  # what ``--method`` takes and the page's element ids use
    label: str  # what the page shows
    build: Callable[[Any], Any]  # the loaded p-MoD model -> the model this method runs
    default: bool = True  # offered when --method is not given


def shared_weights_copy(model):
    """A second model object over the very same parameter and buffer tensors (no new weight
    memory): its modules, attributes and config are its own."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return copy.deepcopy(model, memo={id(tensor): tensor for tensor in tensors})


def as_loaded(model):
    """p-MoD as the checkpoint was trained: its own schedule and routers."""
    return model


def dense_twin(model):
    """The same weights with every decoder layer dense (routers unused)."""
    twin = shared_weights_copy(model)
    num_layers = len(twin.retention_ratios)
    return apply_pmod(twin, twin.pmod_config.replace(ratios=[1.0] * num_layers))


def baseline(name: str, **options):
    """A training-free baseline (``apply_method``) on the same weights."""
    return lambda model: apply_method(shared_weights_copy(model), name, **options)


DEMO_METHODS: tuple[DemoMethod, ...] = (
    DemoMethod("pmod", "p-MoD", as_loaded),
    DemoMethod("dense", "dense (same weights, every layer dense)", dense_twin),
    DemoMethod(
        "fastv",
        "FastV K=2 R=0.5 (half the vision tokens dropped after layer 2)",
        baseline("fastv", fastv_layer=2, fastv_ratio=0.5),
        default=False,
    ),
    DemoMethod(
        "random",
        "random (p-MoD's budget per layer, seed 0)",
        baseline("random", seed=0),
        default=False,
    ),
)


def select_methods(names: Sequence[str] | None = None) -> list[DemoMethod]:
    """The methods named (``["pmod", "dense"]``, or comma-separated entries), in the order given;
    the default ones (p-MoD and its dense twin) when ``names`` is empty."""
    known = {method.name: method for method in DEMO_METHODS}
    wanted = [part.strip() for name in names or () for part in name.split(",") if part.strip()]
    if not wanted:
        return [method for method in DEMO_METHODS if method.default]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UserError(f"unknown --method {', '.join(unknown)}; the demo runs {', '.join(known)}")
    return [known[name] for name in dict.fromkeys(wanted)]
