"""The ways the demo can run a request: the method selector is fed by ``DEMO_METHODS``.

A method turns the loaded p-MoD model into the model that answers for it. It must not change the
loaded model (other methods and later requests use it) and should share its weights rather than
copy them (a 7B model twice does not fit many GPUs): ``shared_weights_copy`` gives a second model
object over the same parameter tensors, whose layers and config a method may then change.

The dense twin is the checkpoint's own weights with every decoder layer dense: the shared copy
re-planned with ratio 1 in every layer (``apply_pmod``), which runs the untouched HF layer forward
and drops the copy's routers. The training-free baselines (``apply_method``) run on a shared copy
too; they are offered only when asked for, spelt as every command spells them
(``--method pmod,dense,fastv:layer=2,ratio=0.5,random``).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..model import apply_method, apply_pmod, parse_methods
from ..model.methods import TokenMethod


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


def other_method(method: TokenMethod):
    """Another registered method (``apply_method``) on the same weights."""
    return lambda model: apply_method(shared_weights_copy(model), method)


ANY_DEPTH = 1 << 20  # layers: the model's depth is checked when the method is installed
# p-MoD and its dense twin: what the page offers when --method is not given
DEFAULT_METHODS: tuple[DemoMethod, ...] = (
    DemoMethod("pmod", "p-MoD", as_loaded),
    DemoMethod("dense", "dense (same weights, every layer dense)", dense_twin),
)


def select_methods(specs: Sequence[str] | None = None) -> list[DemoMethod]:
    """The methods of ``--method`` specs (``["pmod", "dense,fastv:layer=3"]``), in the order
    given, one setting per method; p-MoD and its dense twin when ``specs`` is empty."""
    defaults = {method.name: method for method in DEFAULT_METHODS}
    methods = parse_methods([spec for spec in specs or () if spec.strip()])
    if not methods:
        return list(DEFAULT_METHODS)
    names = [method.name for method in methods]
    for method in methods:  # a setting the method cannot run at any depth (pool without tokens)
        method.check(ANY_DEPTH)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(
            f"the demo runs one setting per method; --method gives {', '.join(twice)} twice"
        )
    return [
        defaults[method.name]
        if method.name in defaults and method == type(method)()
        else DemoMethod(method.name, method.label, other_method(method))
        for method in methods
    ]
