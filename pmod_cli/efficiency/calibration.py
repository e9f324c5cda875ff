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

from ..data.tiny import resolve_name
from ..errors import UserError
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
    from ..data.questions import prompt_inputs, read_image_questions
    from ..model import PMoDConfig, mod_layer_indices, record_routing
    from ..model.families import family_for_model_type, template_for_model
    from ..model.loading import load_checkpoint, read_model_type

    checkpoint, data = Path(checkpoint), Path(data)
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
    question_set = read_image_questions(data, image_folder, samples, videos=takes_video)
    model, processor = load_checkpoint(checkpoint, device=resolve_device(device), require_pmod=True)
    decoder_layers = model.decoder_layers
    template = template_for_model(model)
    mod_layers = mod_layer_indices(model)
    if not mod_layers:
        raise UserError(
            f"{checkpoint} has no MoD layer: every layer is dense, so there is nothing to calibrate"
        )
    pmod = PMoDConfig.from_dict(model.config.pmod)

    kept_share_sums = dict.fromkeys(mod_layers, 0.0)
    vision_sum = text_sum = competing_sum = 0
    for question in _progress(question_set.questions, progress):
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
            kept_share_sums[layer] += int((decision.keep_mask & competing).sum()) / num_competing
        vision = int(decision.vision_mask.sum())
        vision_sum += vision
        text_sum += int(token_valid.sum()) - vision
        competing_sum += num_competing

    count = len(question_set.questions)
    ratios = tuple(
        kept_share_sums[i] / count if i in kept_share_sums else 1.0
        for i in range(len(decoder_layers))
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
        mean_vision_tokens=vision_sum / count,
        mean_text_tokens=text_sum / count,
        mean_competing_tokens=competing_sum / count,
    )


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
