"""An efficiency plan: which model, which p-MoD settings, counted how; what ``pmod flops`` shows.

``make_plan`` turns a ``FlopsRequest``, the user's choices (preset or config, one or several beta
values, schedule, thresholds, token counts, routed tokens, count mode, dtype), into one ``FlopsCount`` per p-MoD
setting, after checking every value; ``plan_to_json`` is the ``--json`` object. A threshold-routing
checkpoint keeps a data-dependent share of tokens: its ratios are measured on calibration samples
(``calibration.py``) and counted like any others. Training-free baselines (``methods``: FastV,
random, pool) are counted next to the first p-MoD setting, at given settings or at the setting
whose count matches it (``match_tflops``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..model.config import PMoDConfig
from ..model.methods import TokenMethod, method_from_dict, parse_methods
from ..model.presets import ModelShape, get_preset, read_model_shape
from ..model.schedules import SCHEDULES
from ..provenance import report_header
from ..runtime import DTYPE_SPELLINGS, parse_dtype
from .calibration import Calibration, measure_retention_ratios
from .flops import COUNT_MODES, ROUTED_TOKENS, FlopsCount, count_flops, match_method

# the paper's headline setting: p-MoD-LLaVA-NeXT-7B
DEFAULT_MODEL = "llava-next-7b"
# the KV cache dtype of the paper's accounting, and of --dtype auto without a checkpoint dtype
DEFAULT_KV_DTYPE = "bf16"
# the --json layout; raised when a field changes meaning or goes away (docs/flops.md)
FLOPS_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PlanEntry:
    """One p-MoD setting and its count."""

    pmod: PMoDConfig
    result: FlopsCount
    calibration: Calibration | None = None  # set when the ratios were measured
    method: TokenMethod = method_from_dict(None)  # another method, at the p-MoD setting's budget
    matched: bool = False  # the baseline's setting was solved to match the first p-MoD count

    @property
    def ratios_source(self) -> str:
        if self.calibration is not None:
            return self.calibration.description
        return "explicit ratios" if self.pmod.ratios is not None else "schedule"

    @property
    def label(self) -> str:
        if not self.method.needs_router:
            return self.method.label + (" (matched)" if self.matched else "")
        if self.calibration is not None:
            return "p-MoD (measured ratios)"
        if self.pmod.ratios is not None:
            return "p-MoD (explicit ratios)"
        schedule = "" if self.pmod.schedule == "cosine" else f" {self.pmod.schedule}"
        return f"p-MoD{schedule} β={self.pmod.beta:g}"


@dataclass(frozen=True)
class FlopsPlan:
    shape: ModelShape
    entries: tuple[PlanEntry, ...]

    @property
    def first(self) -> FlopsCount:
        return self.entries[0].result


@dataclass(frozen=True)
class FlopsRequest:
    """What to count: ``pmod flops``'s flags, one field each (``None``: the default named)."""

    model: str | None = None  # a shape preset (default llava-next-7b); excludes config
    config: str | Path | None = None  # an HF config.json or checkpoint directory
    betas: tuple[float, ...] = ()  # one p-MoD setting per beta
    schedule: str | None = None
    min_ratio: float | None = None
    max_ratio: float | None = None
    vision_tokens: int | None = None
    text_tokens: int | None = None
    video_frames: int | None = None  # count a video of N frames instead of an image
    count: str = "paper"  # one of COUNT_MODES
    dtype: str = "bf16"  # the KV cache's: the --dtype spellings, fp8, or auto
    routed_tokens: str | None = None  # one of ROUTED_TOKENS
    prefix_text_tokens: int | None = None
    calibration: str | Path | None = None  # samples to measure the config checkpoint's ratios on
    calibration_samples: int | None = None
    image_folder: str | Path | None = None
    device: str | None = None  # where the calibration runs
    methods: tuple[str | TokenMethod, ...] = ()  # --method specs or methods
    match_tflops: bool = False


def make_plan(request: FlopsRequest, progress: bool = True) -> FlopsPlan:
    """Check ``request`` and count each p-MoD setting (one per beta).

    With ``config`` pointing at a p-MoD checkpoint, its stored p-MoD options are the starting
    point and the given flags override them (a beta or schedule flag replaces an explicit
    ``ratios`` list). Otherwise the released defaults (PRD cosine, beta 0.5, 0.15-0.85) apply.
    ``calibration`` (a LLaVA JSON / JSONL file) runs the ``config`` checkpoint on
    ``calibration_samples`` samples and counts the ratios it measured; a threshold-routing
    checkpoint needs it. ``dtype`` (the KV cache's) takes the ``--dtype`` spellings and ``fp8``;
    ``auto`` is the checkpoint's stored dtype (bf16 without one).
    ``methods`` (``--method`` specs, ``fastv:layer=2,ratio=0.5``) adds other methods after the
    p-MoD settings (``pmod`` and ``dense`` are always shown), counted at the first one's plan;
    ``match_tflops`` solves each one's knob (FastV's ratio, pool's tokens) to match its count.
    """
    baselines = _baseline_methods(request.methods, request.match_tflops, request.calibration)
    _check_token_flags(request)
    _check_calibration_flags(request)
    _check_value_flags(request)
    dtype = _kv_dtype(request)
    shape = (
        read_model_shape(request.config)
        if request.config is not None
        else get_preset(request.model or DEFAULT_MODEL)
    )
    base = shape.pmod or PMoDConfig()
    overrides = _pmod_overrides(base, request)
    effective_routed = overrides.get("routed_tokens", base.routed_tokens)
    _check_prefix_tokens(
        request.prefix_text_tokens,
        effective_routed,
        shape.text_tokens if request.text_tokens is None else request.text_tokens,
    )
    token_options = dict(
        vision_tokens=request.vision_tokens,
        text_tokens=request.text_tokens,
        count=request.count,
        dtype=dtype,
        routed_tokens=effective_routed,
        prefix_text_tokens=request.prefix_text_tokens,
        video_frames=request.video_frames,
    )
    if request.calibration is not None:
        return _calibrated_plan(request, shape, base, token_options, progress)
    if base.inference_routing == "threshold":
        raise UserError(
            "this p-MoD setting uses threshold routing, which keeps a data-dependent share of tokens; pass "
            "--calibration FILE.json (LLaVA-format image-question samples) with --config CHECKPOINT_DIR to measure its ratios"
        )
    entries = _pmod_entries(request.betas or [base.beta], shape, base, overrides, token_options)
    entries += _baseline_entries(shape, entries[0], baselines, request.match_tflops, token_options)
    return FlopsPlan(shape, tuple(entries))


def _kv_dtype(request: FlopsRequest) -> str:
    """The KV cache's dtype: ``auto`` is the checkpoint's stored dtype (bf16 without one)."""
    dtype = parse_dtype(request.dtype, extra=("fp8",))
    if dtype == "auto":
        dtype = (
            _stored_dtype(request.config) if request.config is not None else None
        ) or DEFAULT_KV_DTYPE
    return dtype


def _calibrated_plan(
    request: FlopsRequest, shape: ModelShape, base: PMoDConfig, token_options: dict, progress: bool
) -> FlopsPlan:
    """The ``config`` checkpoint's count at the ratios it keeps on the calibration samples."""
    measured = measure_retention_ratios(
        request.config,
        request.calibration,
        samples=16 if request.calibration_samples is None else request.calibration_samples,
        image_folder=request.image_folder,
        device=request.device,
        progress=progress,
    )
    result = count_flops(shape, measured.ratios, mod_layers=measured.mod_layers, **token_options)
    return FlopsPlan(shape, (PlanEntry(base, result, measured),))


def _pmod_entries(
    betas, shape: ModelShape, base: PMoDConfig, overrides: dict, token_options: dict
) -> list[PlanEntry]:
    """One p-MoD setting per beta; an invalid one is a UserError."""
    entries = []
    for beta in betas:
        try:
            pmod = base.replace(**overrides, beta=beta)
            ratios = pmod.retention_ratios(shape.text.num_layers)
        except ValueError as err:
            raise UserError(f"invalid p-MoD setting: {err}") from None
        entries.append(PlanEntry(pmod, count_flops(shape, ratios, **token_options)))
    return entries


def _check_token_flags(request: FlopsRequest) -> None:
    if request.model is not None and request.config is not None:
        raise UserError("give either --model or --config, not both")
    if request.routed_tokens is not None and request.routed_tokens not in ROUTED_TOKENS:
        raise UserError(
            f"--routed-tokens must be one of {', '.join(ROUTED_TOKENS)}, got {request.routed_tokens!r}"
        )
    if request.prefix_text_tokens is not None and request.prefix_text_tokens < 0:
        raise UserError(f"--prefix-text-tokens must be >= 0, got {request.prefix_text_tokens}")


def _check_value_flags(request: FlopsRequest) -> None:
    if request.count not in COUNT_MODES:
        raise UserError(f"--count must be one of {', '.join(COUNT_MODES)}, got {request.count!r}")
    for beta in request.betas:
        if not beta >= 0:  # also rejects nan
            raise UserError(f"--beta must be >= 0, got {beta}")
    if request.schedule is not None and request.schedule not in SCHEDULES:
        raise UserError(
            f"unknown --schedule {request.schedule!r}; choose one of {', '.join(sorted(SCHEDULES))}"
        )
    for flag, value in (("--min-ratio", request.min_ratio), ("--max-ratio", request.max_ratio)):
        if value is not None and not 0.0 < value <= 1.0:
            raise UserError(f"{flag} must be in (0, 1], got {value}")
    for flag, value in (
        ("--vision-tokens", request.vision_tokens),
        ("--text-tokens", request.text_tokens),
    ):
        if value is not None and value < 0:
            raise UserError(f"{flag} must be >= 0, got {value}")
    if request.video_frames is not None and (
        request.video_frames < 1 or request.vision_tokens is not None
    ):
        raise UserError("--video-frames must be at least 1 and cannot go with --vision-tokens")


def _pmod_overrides(base: PMoDConfig, request: FlopsRequest) -> dict:
    """The flags' changes to the stored (or default) p-MoD options."""
    overrides = {}
    if request.routed_tokens is not None:
        overrides["routed_tokens"] = request.routed_tokens
    if request.schedule is not None:
        overrides["schedule"] = request.schedule
    if request.min_ratio is not None:
        overrides["min_ratio"] = request.min_ratio
    if request.max_ratio is not None:
        overrides["max_ratio"] = request.max_ratio
    if (request.betas or request.schedule is not None) and base.ratios is not None:
        overrides["ratios"] = None  # the flags ask for a schedule, not the stored list
    effective_min = overrides.get("min_ratio", base.min_ratio)
    effective_max = overrides.get("max_ratio", base.max_ratio)
    if effective_min > effective_max:
        raise UserError(
            f"--min-ratio {effective_min} is above --max-ratio {effective_max}; need min-ratio <= max-ratio"
        )
    return overrides


def _check_prefix_tokens(prefix_text_tokens, routed_tokens, num_text) -> None:
    if prefix_text_tokens is not None and routed_tokens == "vision":
        raise UserError(
            "--prefix-text-tokens only applies when text tokens compete; this setting routes vision tokens only "
            "(add --routed-tokens all)"
        )
    if prefix_text_tokens is not None and prefix_text_tokens > num_text:
        raise UserError(
            f"--prefix-text-tokens {prefix_text_tokens} is more than the {num_text} text tokens; "
            "lower it or raise --text-tokens"
        )


def _baseline_entries(shape, reference, baselines, match_tflops, token_options) -> list:
    """The baselines counted at the first p-MoD setting's plan (solved to its TFLOPs if asked)."""
    entries = []
    for method in baselines:
        if match_tflops:
            method = match_method(
                shape,
                reference.result.retention_ratios,
                method,
                reference.result.flops,
                **token_options,
            )
        result = count_flops(
            shape, reference.result.retention_ratios, method=method, **token_options
        )
        entries.append(
            PlanEntry(
                reference.pmod,
                result,
                method=method.for_family(shape.family.name),  # as it runs there (its label too)
                matched=match_tflops and method.knob is not None,
            )
        )
    return entries


def _baseline_methods(methods, match_tflops, calibration) -> list[TokenMethod]:
    """The other methods asked for (p-MoD's settings and the dense model are always counted)."""
    chosen = parse_methods(methods, match_tflops)
    baselines = [method for method in chosen if method.name not in ("pmod", "dense")]
    if calibration is not None and baselines:
        raise UserError(
            "--calibration counts the checkpoint's own measured routing; drop the baseline --method"
        )
    return baselines


def _check_calibration_flags(request: FlopsRequest) -> None:
    if request.calibration is None:
        for flag, value in (
            ("--calibration-samples", request.calibration_samples),
            ("--image-folder", request.image_folder),
            ("--device", request.device),  # without calibration no model runs
        ):
            if value is not None:
                raise UserError(f"{flag} only applies with --calibration FILE.json")
        return
    if request.config is None or request.model is not None:
        raise UserError(
            "--calibration runs a checkpoint on samples: give --config CHECKPOINT_DIR (a p-MoD checkpoint)"
        )
    changed = [
        flag
        for flag, value in (
            ("--beta", request.betas),
            ("--schedule", request.schedule),
            ("--min-ratio", request.min_ratio),
            ("--max-ratio", request.max_ratio),
            ("--routed-tokens", request.routed_tokens),
        )
        if value not in (None, (), [])
    ]
    if changed:
        raise UserError(
            f"--calibration measures the checkpoint's own routing; drop {', '.join(changed)}"
        )


def plan_to_json(plan: FlopsPlan) -> dict:
    """One JSON object: the report header (schema, versions, time, command), the model and the
    count settings, then one entry per p-MoD setting in ``plans``."""
    plans = []
    for entry in plan.entries:
        numbers = entry.result.to_dict()
        for key in (
            "model",
            "count",
            "count_description",
            "vision_tokens",
            "text_tokens",
            "vision_crops",
            "dtype",
            "routed_tokens",
            "prefix_text_tokens",
            "competing_tokens",
        ):
            numbers.pop(key)
        plans.append(
            {
                "label": entry.label,
                "matched": entry.matched,
                "ratios_source": entry.ratios_source,
                "calibration": entry.calibration.to_dict()
                if entry.calibration is not None
                else None,
                "beta": entry.pmod.beta,
                "schedule": entry.pmod.schedule,
                "min_ratio": entry.pmod.min_ratio,
                "max_ratio": entry.pmod.max_ratio,
                "pmod": entry.pmod.to_dict(),
                **numbers,
            }
        )
    first = plan.first
    return {
        **report_header(FLOPS_SCHEMA_VERSION),
        "model": plan.shape.name,
        "description": plan.shape.description,
        "layout": plan.shape.layout,
        "count": first.count,
        "count_description": COUNT_MODES[first.count],
        "vision_tokens": first.vision_tokens,
        "text_tokens": first.text_tokens,
        "vision_crops": first.vision_crops,
        "dtype": first.dtype,
        "routed_tokens": first.routed_tokens,
        "prefix_text_tokens": first.prefix_text_tokens,
        "competing_tokens": first.competing_tokens,
        "inference_routing": plan.entries[0].pmod.inference_routing,
        "plans": plans,
    }


def _stored_dtype(config: str | Path) -> str | None:
    """The dtype a checkpoint's config.json names (``dtype``, older ``torch_dtype``), as a short name."""
    import json

    path = Path(config)
    config_file = path / "config.json" if path.is_dir() else path
    try:
        values = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # read_model_shape has already said what is wrong with it
    sections = [values, values.get("text_config") or {}] if isinstance(values, dict) else []
    for section in sections:
        for key in ("dtype", "torch_dtype"):
            name = section.get(key)
            if isinstance(name, str) and name.lower() in DTYPE_SPELLINGS and name != "auto":
                return DTYPE_SPELLINGS[name.lower()]
    return None
