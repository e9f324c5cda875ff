"""What a token-reduction method is, the registry of methods, and the one ``--method`` syntax.

A method says what each decoder layer does with the vision tokens of a forward call. Each is a
frozen dataclass registered with ``@register_method``: its fields are its options (with
defaults), and it answers the questions the rest of pmod asks of it:

- ``layer_modes`` / ``kept_vision_tokens``: the per-layer plan that the layers run and that the
  FLOPs/KV formula (``efficiency/flops.py``) counts;
- ``entering_tokens``: vision tokens per image that enter the language model (a method that
  shortens the prompt, like ``pool``, says how many);
- ``ranking_layers`` / ``rank`` / ``select``: how its layers choose (no router); ``rewrite_states``:
  what a subset layer runs from, where a method writes merged tokens in (SparseVLM);
- ``install``: anything else it hooks onto a model (``pool``'s projector hook);
- ``knob`` / ``settings``: the option ``--match-tflops`` solves and the values it tries;
- ``check`` / ``check_family``: refusals, one line each;
- ``label``: how tables and plots name it.

The spelling is ``NAME[:key=value,...]``, several methods comma-separated or repeated:
``--method dense,pmod,fastv:layer=2,ratio=0.5``. ``;`` also separates options (lmms-eval splits
its ``model_args`` on commas: ``method=fastv:layer=2;ratio=0.5``). Another installed package
adds a method through the ``pmod_cli.methods`` entry point group (a module that registers it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, ClassVar

from ...errors import UserError

# what a decoder layer does under a method: every token, p-MoD's router, or the method's subset
LAYER_MODES = ("dense", "route", "subset")
ENTRY_POINT_GROUP = "pmod_cli.methods"


class MethodError(UserError, ValueError):
    """A method setting that cannot work (unknown name or option, value out of range, layer past
    the model)."""


@dataclass(frozen=True)
class TokenMethod:
    """A token-reduction method and its options (the dataclass fields)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # the method and its source, for docs and help
    knob: ClassVar[str | None] = None  # the option --match-tflops solves (None: nothing to tune)
    needs_router: ClassVar[bool] = False  # runs a p-MoD checkpoint's own routers
    needs_vision_tokens: ClassVar[bool] = False  # check/install need an image's vision tokens
    # the images (and videos) one sample may hold; None: any. A method with a limit refuses more
    # in one line when a forward call holds them (dart: 1, and no video)
    images_per_sample: ClassVar[int | None] = None
    trains: ClassVar[bool] = False  # a recipe may train with it ([train] method)
    # the kept tokens are the top of the scores ``select`` returns (and records); DART's are
    # not: its pivots and least-similar picks are no one ranking
    top_scored: ClassVar[bool] = True

    # ---- naming ---------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return self.name

    @property
    def spec(self) -> str:
        """The ``--method`` spelling of this setting (options that differ from the defaults)."""
        changed = [
            f"{field.name}={getattr(self, field.name)}"
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != field.default
        ]
        return self.name + (":" + ",".join(changed) if changed else "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> TokenMethod:
        return _build(type(self), {**dataclasses.asdict(self), **changes})

    # ---- refusals -------------------------------------------------------------------------

    def check(self, num_layers: int, vision_tokens: int | None = None) -> None:
        """Refuse settings that do not fit a model of ``num_layers`` layers whose images have
        ``vision_tokens`` vision tokens (None: not known here)."""

    def for_family(self, family_name: str) -> TokenMethod:
        """This setting as it runs on the family ``family_name`` (default: itself). VisionZip
        returns its Qwen2.5-VL port there, which merges after the merger inside the model."""
        return self

    def check_config(self, config) -> None:
        """Refuse a checkpoint's transformers ``config`` this method cannot run on, before any
        model is built (VisionZip: a tower without a CLS token or a feature layer to rank in)."""

    def check_family(self, family) -> None:
        """Refuse a model family this method does not run on (``family.unsupported_methods``)."""
        refused = family.unsupported_methods.get(self.name)
        if refused:
            raise MethodError(f"{self.name} does not run on {family.title}: {refused}")

    # ---- the plan -------------------------------------------------------------------------

    def layer_modes(self, pmod_ratios: Sequence[float]) -> list[str]:
        """Per decoder layer: ``dense``, ``route`` (p-MoD's router) or ``subset``."""
        return ["dense"] * len(pmod_ratios)

    def kept_vision_tokens(self, pmod_ratios: Sequence[float], num_vision: int) -> list[int]:
        """Vision tokens each decoder layer processes, for an image of ``num_vision`` tokens
        entering the language model; ``pmod_ratios``: p-MoD's plan (a budget to borrow)."""
        return [num_vision] * len(pmod_ratios)

    def entering_tokens(self, num_vision: int, crops: int = 1) -> int:
        """Vision tokens per image that enter the language model, for an image of ``num_vision``
        tokens that the vision tower sees as ``crops`` crops (LLaVA-NeXT: base + grid)."""
        return num_vision

    def prompt_tokens_per_image(self) -> int | None:
        """Image placeholders a prompt must hold per image (None: the processor's count)."""
        return None

    def image_placeholders(self, model, inputs: dict) -> list[int] | None:
        """Per image of a forward call or processor batch (in the order the model fills them),
        the placeholders its prompt must hold, where that depends on the image (``visionzip`` on
        LLaVA-NeXT: its crops); None: ``prompt_tokens_per_image`` (or the processor's count).
        ``inputs``: the processor's outputs (``image_sizes``, ...)."""
        return None

    def prepare_images(self, images: list) -> list:
        """The images (PIL) as the processor gets them: the prompt encoder
        (``data.prompts.encode``) hands every image through here first (``downsample`` resizes
        them); default: as they are."""
        return images

    def vision_layout(self, shape) -> tuple[int, int]:
        """(V, crops) of the largest image of ``shape`` as this method hands it to the processor,
        for a count given no V (``downsample``: the downsampled image's); default: the family's."""
        return shape.vision_tokens, shape.vision_crops

    def ranking_flops(self, shape, num_vision: int, num_text: int) -> int:
        """FLOPs of the method's own choosing for a prefill of ``num_vision`` + ``num_text``
        tokens (its scores, beyond what the model computes anyway); counted under
        ``--count full`` only, as the paper count leaves selection out."""
        return 0

    def settings(self, num_vision: int) -> list[TokenMethod]:
        """The settings ``--match-tflops`` chooses among (the knob's values)."""
        return [self]

    # ---- on a model -----------------------------------------------------------------------

    def ranking_layers(self, num_layers: int) -> set[int]:
        """Dense layers that rank the vision tokens as they run (``rank``)."""
        return set()

    def rank(self, layer, projections: dict, position_embeddings, routing) -> None:
        """In a ranking layer, after it ran: choose the vision tokens (``routing.ranked_keep``)."""
        raise NotImplementedError(f"{self.name} ranks in no layer")

    def select(self, layer, routing, hidden_states, position_embeddings):
        """In a ``subset`` layer, before it runs: (batch, seq) bool kept tokens and the scores
        that chose them. ``hidden_states`` (batch, seq, hidden) is the layer's input and
        ``position_embeddings`` its RoPE (cos, sin), for a method that ranks with the layer's own
        projections; ``routing.ranked_keep`` holds what an earlier layer chose."""
        raise NotImplementedError(f"{self.name} runs no subset layer")

    def kept_positions(self, layer, keep, position_ids, position_embeddings, cache):
        """In a ``subset`` layer, after ``select``: the positions (batch, seq) and RoPE (cos, sin)
        its kept tokens run at. Default: their original ones; PyramidDrop's ``positions=reindex``
        numbers them contiguously."""
        return position_ids, position_embeddings

    def rewrite_states(self, layer, routing, hidden_states):
        """In a ``subset`` layer, before ``select``: the hidden states (batch, seq, hidden) the
        layer runs from. Default: its input as it is; SparseVLM writes its recycled tokens into
        the places of pruned ones here. Returns a new tensor; the input is left as it is."""
        return hidden_states

    def install(self, model, vision_tokens: int | None) -> None:
        """Hook anything else onto ``model`` (the layers are set up by ``install_method``)."""

    def layer_ratio(self, layer) -> float:
        """The share of the vision tokens ``layer`` keeps, as routing records report it."""
        return layer.pmod_ratio


# ---- the registry -------------------------------------------------------------------------

_METHODS: dict[str, type[TokenMethod]] = {}
_entry_points_loaded = False


def register_method(cls: type[TokenMethod]) -> type[TokenMethod]:
    """Class decorator: make a method known by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise TypeError(f"a method named {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def method_registry() -> dict[str, type[TokenMethod]]:
    """Every registered method by name, those of installed plug-ins included."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            entry_point.load()  # a module that registers its methods, or the class itself
    return dict(_METHODS)


def method_names() -> tuple[str, ...]:
    return tuple(method_registry())


def method_class(name: str) -> type[TokenMethod]:
    registry = method_registry()
    if name not in registry:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(registry)}")
    return registry[name]


def make_method(name: str, **options: Any) -> TokenMethod:
    """The method ``name`` with ``options`` (its fields); others keep their defaults."""
    return _build(method_class(name), options)


def _build(cls: type[TokenMethod], options: dict[str, Any]) -> TokenMethod:
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise MethodError(
            f"unknown option(s) {', '.join(unknown)} for method {cls.name} (its options: {known})"
        )
    return cls(**{key: _coerce(cls.name, fields[key], value) for key, value in options.items()})


def _coerce(method: str, field: dataclasses.Field, value: Any) -> Any:
    """A value of the option's type (options given as text: ``--method fastv:layer=2``)."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if not isinstance(value, str) or "str" in kind:
        return value
    text = value.strip()
    try:
        if "None" in kind and text.lower() == "none":
            return None
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("bool"):
            return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
    except (ValueError, KeyError):
        raise MethodError(
            f"{method}'s option {field.name} takes {kind.split(' |')[0]}, got {value!r}"
        ) from None
    return text


def method_from_dict(values: dict[str, Any] | None) -> TokenMethod:
    """A method from its ``to_dict`` (as stored in ``config.pmod_method``); None: ``pmod``.

    Reads the layout pmod 0.1 stored too (one flat record of every baseline's options:
    ``fastv_layer``, ``pool_tokens``, ...): a method keeps its own, named without the prefix."""
    values = dict(values or {})
    cls = method_class(values.pop("name", "pmod"))
    own = {field.name for field in dataclasses.fields(cls)}
    if set(values) <= own:
        return _build(cls, values)
    options = {}
    for key, value in values.items():
        short = key.removeprefix(f"{cls.name}_")
        if short in own:
            options[short] = value
        elif key in own:
            options[key] = value
    return _build(cls, options)


# ---- the --method syntax ------------------------------------------------------------------


def parse_method(spec: str, match_tflops: bool = False) -> TokenMethod:
    """``NAME[:key=value,...]`` (options also separated by ``;``) -> the method."""
    methods = parse_methods([spec], match_tflops)
    if len(methods) != 1:
        raise MethodError(f"expected one method, got {spec!r}")
    return methods[0]


def parse_methods(
    specs: Iterable[str | TokenMethod], match_tflops: bool = False
) -> list[TokenMethod]:
    """Every method of repeated/comma-separated ``--method`` values, in order, duplicates dropped.

    A comma-separated piece with ``=`` and no ``:`` is an option of the method before it:
    ``dense,fastv:layer=3,ratio=0.75,pool:tokens=4`` is three methods. ``match_tflops``: each
    method's knob is solved later (``efficiency.flops.match_method``), so it must not be given."""
    groups: list[tuple[str, dict[str, Any]]] = []
    for spec in specs:
        if isinstance(spec, TokenMethod):
            groups.append((spec.name, {k: v for k, v in spec.to_dict().items() if k != "name"}))
        else:
            groups.extend(_spec_groups(spec))
    methods = [make_method(name, **options) for name, options in groups]
    if match_tflops:
        _check_match(methods, [options for _, options in groups])
    return list(dict.fromkeys(methods))


def _spec_groups(spec: str) -> list[tuple[str, dict[str, Any]]]:
    groups: list[tuple[str, dict[str, Any]]] = []
    for piece in (part.strip() for part in spec.replace(";", ",").split(",")):
        if not piece:
            continue
        name, colon, option = piece.partition(":")
        if not colon and "=" in piece:  # an option of the method before it
            if not groups:
                raise MethodError(f"--method {spec!r}: option {piece!r} comes before any method")
            name, option = "", piece
        if name:
            groups.append((name.strip(), {}))
        if option:
            key, equals, value = option.partition("=")
            if not equals or not key.strip():
                raise MethodError(f"--method {spec!r}: option {option!r} is not key=value")
            groups[-1][1][key.strip()] = value
    return groups


def _check_match(methods: Sequence[TokenMethod], given: Sequence[dict[str, Any]]) -> None:
    for method, options in zip(methods, given, strict=True):
        if method.knob is not None and method.knob in options:
            raise MethodError(
                f"--match-tflops chooses {method.name}'s {method.knob} itself; drop {method.knob}="
            )
    if not any(method.knob is not None for method in methods):
        names = ", ".join(name for name, cls in method_registry().items() if cls.knob)
        raise MethodError(f"--match-tflops solves a method's knob: add one of {names} to --method")
