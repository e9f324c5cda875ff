"""Measured retention ratios: what a p-MoD checkpoint keeps on real samples.

With threshold routing (``inference_routing="threshold"``) a MoD layer keeps every competing
token whose sigmoid(router logit) exceeds the threshold, so how many it keeps depends on the
data. ``measure_retention_ratios`` runs the checkpoint's prefill on image-question samples and
records, per MoD layer, kept competing tokens / competing tokens (``record_routing``); the mean
over samples is the layer's ratio for ``count_flops``.

    calibration = measure_retention_ratios("runs/gamma/sft", "calib.json", samples=16)
    count_flops(shape, calibration.ratios, mod_layers=calibration.mod_layers, routed_tokens=...)

Samples are read like ``pmod arank`` reads them (the first user turn and the images, and for a
model that takes video the videos, of LLaVA JSON / JSONL samples) and prompted with the
checkpoint's chat template, one sample per forward call (no padding). The competing tokens are the ones the layer itself lets compete (``competing_tokens``:
the vision tokens, or with ``routed_tokens="all"`` every real token up to the last image token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.questions import QuestionSet, prompt_inputs, read_image_questions
from ..data.tiny import resolve_name
from ..errors import UserError
from ..model import PMoDConfig, mod_layer_indices, record_routing
from ..model.families import family_for_model_type, template_for_model
from ..model.loading import load_checkpoint, read_model_type
from ..runtime import resolve_device


@dataclass(frozen=True)
class Calibration:
    """Per-layer ratios measured on calibration samples."""

    checkpoint: str
    data: str
    samples: int  # samples run
    skipped: int  # samples of the file passed over (no image, malformed conversation)
    inference_routing: str  # "topk" | "threshold"
    routed_tokens: str  # "vision" | "all"
    ratios: tuple[float, ...]  # per decoder layer: 1.0 dense; MoD: mean of kept / competing
    mod_layers: tuple[int, ...]
    mean_vision_tokens: float
    mean_text_tokens: float
    mean_competing_tokens: float

    @property
    def description(self) -> str:
        noun = "sample" if self.samples == 1 else "samples"
        return f"ratios measured on {self.samples} calibration {noun} ({self.inference_routing} routing)"

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "ratios": list(self.ratios),
            "mod_layers": list(self.mod_layers),
            "description": self.description,
        }


def measure_retention_ratios(
    checkpoint: str | Path,
    data: str | Path,
    *,
    samples: int = 16,
    image_folder: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Calibration:
    """Run ``checkpoint`` (a p-MoD directory with weights) on ``samples`` image-question samples
    of ``data`` and measure each MoD layer's share of kept competing tokens."""
    checkpoint = Path(checkpoint)
    data, question_set = _read_samples(checkpoint, Path(data), samples, image_folder)
    model, processor = load_checkpoint(checkpoint, device=resolve_device(device), require_pmod=True)
    mod_layers = mod_layer_indices(model)
    if not mod_layers:
        raise UserError(
            f"{checkpoint} has no MoD layer: every layer is dense, so there is nothing to calibrate"
        )
    pmod = PMoDConfig.from_dict(model.config.pmod)
    tally = _tally(model, processor, question_set.questions, mod_layers, progress)

    count = len(question_set.questions)
    ratios = tuple(
        tally.kept_shares[i] / count if i in tally.kept_shares else 1.0
        for i in range(len(model.decoder_layers))
    )
    return Calibration(
        checkpoint=str(checkpoint),
        data=str(data),
        samples=count,
        skipped=question_set.skipped,
        inference_routing=pmod.inference_routing,
        routed_tokens=pmod.routed_tokens,
        ratios=ratios,
        mod_layers=tuple(mod_layers),
        mean_vision_tokens=tally.vision / count,
        mean_text_tokens=tally.text / count,
        mean_competing_tokens=tally.competing / count,
    )


def _read_samples(
    checkpoint: Path, data: Path, samples: int, image_folder: str | Path | None
) -> tuple[Path, QuestionSet]:
    """The calibration file (``tiny:`` names resolved) and up to ``samples`` of its questions;
    a UserError for a bad count, a checkpoint that is not a directory or a missing file."""
    if samples < 1:
        raise UserError(f"--calibration-samples must be at least 1, got {samples}")
    if not checkpoint.is_dir():
        raise UserError(
            f"--calibration runs the model: --config must be a p-MoD checkpoint directory with weights, got {checkpoint}"
        )
    takes_video = family_for_model_type(read_model_type(checkpoint)).takes_video
    data = Path(resolve_name(data))
    if not data.is_file():
        raise UserError(
            f"calibration file {data} does not exist; pass --calibration, a LLaVA JSON or JSONL file"
        )
    image_folder = Path(resolve_name(image_folder)) if image_folder is not None else None
    return data, read_image_questions(data, image_folder, samples, videos=takes_video)


@dataclass
class _Tally:
    """Sums over the samples: per MoD layer the share of competing tokens kept, and the tokens
    (the competing ones as the last MoD layer counts them)."""

    kept_shares: dict[int, float]
    vision: int = 0
    text: int = 0
    competing: int = 0


def _tally(model, processor, questions: list, mod_layers: list[int], progress: bool) -> _Tally:
    """Each question's prefill, one at a time, with its routing recorded."""
    decoder_layers = model.decoder_layers
    template = template_for_model(model)
    tally = _Tally(kept_shares=dict.fromkeys(mod_layers, 0.0))
    for question in _progress(questions, progress):
        inputs = prompt_inputs(processor, model, [question], template)
        with torch.inference_mode(), record_routing(model) as routing:
            model(**inputs, use_cache=False)
        token_valid = inputs["attention_mask"].bool().cpu()  # (1, seq)
        for layer in mod_layers:
            decision = routing.layers[layer]
            competing = decoder_layers[layer].competing_tokens(
                decision.vision_mask, token_valid
            )  # (1, seq)
            num_competing = int(competing.sum())
            if num_competing == 0:
                raise RuntimeError(
                    f"sample {question.sample_id}: no token competes in layer {layer}"
                )
            tally.kept_shares[layer] += int((decision.keep_mask & competing).sum()) / num_competing
        vision = int(decision.vision_mask.sum())
        tally.vision += vision
        tally.text += int(token_valid.sum()) - vision
        tally.competing += num_competing
    return tally


def _progress(items, enabled: bool):
    from rich.console import Console
    from rich.progress import track

    # on stderr and transient: stdout stays one JSON object, an error leaves only its line
    return track(
        items,
        description="calibrating",
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )
