"""PMoDConfig: every option of a p-MoD conversion, with the released code's behaviour as default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .schedules import SCHEDULES, retention_ratios
from .selection import SELECTION_RULES

WEIGHT_NORMS = ("tanh", "sigmoid", "softmax", "shifted_softmax", "none")
REWEIGHT_TARGETS = ("mlp", "block")
ROUTED_TOKENS = ("vision", "all")
ROUTER_INPUTS = ("hidden", "normed")
INFERENCE_ROUTING = ("topk", "threshold")
BUDGETS = ("sample", "image")


@dataclass
class PMoDConfig:
    """How a LLaVA model's decoder layers become p-MoD layers.

    Attributes:
        schedule: retention-ratio schedule (``cosine`` is PRD; also ``linear``, ``stepped``,
            ``constant``, ``interleaved``; the released code's forms ``cosine31``, ``linear31``
            (a fixed 31 in place of L - 1), ``interleave``, ``deep_all``,
            ``deep_all_include_last`` (MoD layers at ratio beta)).
        beta: shift of the schedule; 0.5 gives dense layers 0-7 and MoD layers 8-31 at 32 layers.
        max_ratio: a layer whose scheduled ratio exceeds this stays dense (no router).
        min_ratio: lower clamp of the ratio of a MoD layer.
        ratios: explicit per-layer ratios (1.0 = dense); overrides schedule and thresholds.
        mod_layers: only these layers may be MoD (e.g. chosen by ARank); the rest are dense.
        alpha: gating factor of the weight norm (TanhNorm: w = 1 + alpha * tanh(r)).
        weight_norm: ``tanh`` (TanhNorm), ``sigmoid`` (alpha * sigmoid), ``softmax`` (alpha *
            softmax over the sample's vision tokens), ``shifted_softmax`` (alpha * softmax +
            shift), ``none`` (raw router output).
        softmax_shift: the shift b of ``shifted_softmax``; None means -alpha / 2 (zero-centred range).
        string: symmetric token reweighting: a skipped vision token becomes w * x.
        reweight: ``mlp`` scales the MLP branch of a kept vision token (released code);
            ``block`` scales the whole layer delta (paper eq. 4).
        budget: who the kept share is counted over. ``sample`` (the paper's rule): each sample keeps
            floor(n * R) of all its n vision tokens, images and video frames competing together;
            ``image``: each image and each video frame keeps floor(n * R) of its own n tokens, so
            one large image cannot take every slot from the others.
        selection: which competing tokens win (``model/selection.py``): ``score`` ranks the raw
            router scores (the paper's rule); ``weight`` ranks the normalised weights with
            torch.topk as the released code does, ties and all (set on checkpoints imported
            from the released code).

    Options from gamma-MoD (see docs/gamma.md), off by default:
        shared_router: one router for all MoD layers instead of one per layer.
        router_input: the router reads the ``hidden`` state entering the layer (p-MoD) or the
            ``normed`` one after the input layernorm (gamma-MoD).
        routed_tokens: ``vision`` (p-MoD) or ``all``: vision and text tokens compete. At
            inference, and in training with ``masked_routing``, only the tokens up to the last
            image token compete (system prompt and image); question, answer and generated
            tokens always pass, which keeps cached and uncached generation identical.
        masked_routing: gamma-MoD's masked routing learning (see routed_tokens).
        aux_loss_coef: weight of the auxiliary routing loss (binary cross-entropy of the router
            logits against the top-k decision, summed over MoD layers; gamma-MoD: 0.01).
        inference_routing: ``topk`` keeps floor(n * R) tokens at inference as in training;
            ``threshold`` keeps a token when sigmoid(r) > routing_threshold.
    """

    schedule: str = "cosine"
    beta: float = 0.5
    max_ratio: float = 0.85
    min_ratio: float = 0.15
    ratios: list[float] | None = None
    mod_layers: list[int] | None = None
    alpha: float = 0.2
    weight_norm: str = "tanh"
    softmax_shift: float | None = None
    string: bool = True
    reweight: str = "mlp"
    budget: str = "sample"
    selection: str = "score"
    shared_router: bool = False
    router_input: str = "hidden"
    routed_tokens: str = "vision"
    masked_routing: bool = False
    aux_loss_coef: float = 0.0
    inference_routing: str = "topk"
    routing_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(sorted(SCHEDULES))}"
            )
        if self.weight_norm not in WEIGHT_NORMS:
            raise ValueError(
                f"unknown weight_norm {self.weight_norm!r}; choose one of {', '.join(WEIGHT_NORMS)}"
            )
        if self.selection not in SELECTION_RULES:
            raise ValueError(
                f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTION_RULES)}"
            )
        if self.reweight not in REWEIGHT_TARGETS:
            raise ValueError(
                f"unknown reweight {self.reweight!r}; choose one of {', '.join(REWEIGHT_TARGETS)}"
            )
        for name, allowed in (
            ("routed_tokens", ROUTED_TOKENS),
            ("router_input", ROUTER_INPUTS),
            ("inference_routing", INFERENCE_ROUTING),
            ("budget", BUDGETS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )
        if self.budget == "image" and self.routed_tokens != "vision":
            raise ValueError(
                'budget "image" splits vision tokens by image; it needs routed_tokens "vision"'
            )
        if self.budget == "image" and self.selection != "score":
            raise ValueError(
                'budget "image" ranks raw router scores within each image; it needs selection "score"'
            )
        if not 0.0 < self.routing_threshold < 1.0:
            raise ValueError(f"routing_threshold must be in (0, 1), got {self.routing_threshold}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 < self.min_ratio <= self.max_ratio <= 1.0:
            raise ValueError(
                f"need 0 < min_ratio <= max_ratio <= 1, got min_ratio {self.min_ratio}, max_ratio {self.max_ratio}"
            )
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    def retention_ratios(self, num_layers: int) -> list[float]:
        """The ratio each of ``num_layers`` layers keeps; 1.0 marks a dense layer."""
        return retention_ratios(
            num_layers,
            schedule=self.schedule,
            beta=self.beta,
            min_ratio=self.min_ratio,
            max_ratio=self.max_ratio,
            ratios=self.ratios,
            mod_layers=self.mod_layers,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PMoDConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown p-MoD option(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **overrides: Any) -> PMoDConfig:
        return PMoDConfig.from_dict({**self.to_dict(), **overrides})
