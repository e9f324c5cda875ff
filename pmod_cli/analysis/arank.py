"""ARank (gamma-MoD): the rank of each decoder layer's attention maps, and the MoD layers it proposes.

ARank of a layer: for every head, take the causal attention map over one sample's real tokens,
zero its diagonal and compute its numerical rank (``torch.linalg.matrix_rank``, default
tolerance); average over heads and samples. A low-ARank layer's attention is redundant, so that
layer is the one to turn into a MoD layer; the K highest-ARank layers stay dense.

    result = measure_arank("runs/tiny/sft", "data.json", samples=16, dense_layers=4)
    result.save("arank.json")
    PMoDConfig(mod_layers=load_arank_layers("arank.json"))

The maps are taken from each attention module's output by a forward hook and ranked at once, so
only one layer's maps are alive at a time (``output_attentions=True`` would hold every layer's:
gigabytes per LLaVA-NeXT sample). In a p-MoD checkpoint a MoD layer attends over its kept tokens
only, so its map, and its ARank, covers those tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch

from ..data.questions import QuestionSet, prompt_inputs, read_image_questions
from ..data.tiny import resolve_name
from ..errors import UserError
from ..model import mod_layer_indices
from ..model.families import family_for_model_type, template_for_model
from ..model.loading import load_checkpoint, read_model_type, read_num_layers
from ..model.routing import record_routing
from ..runtime import parse_dtype, resolve_device, torch_dtype

# ---- the measure ------------------------------------------------------------------------


def attention_rank(attention: torch.Tensor) -> torch.Tensor:
    """(..., n, n) causal attention maps of one sample's real tokens -> (...,) rank, diagonal zeroed.

    The diagonal is zeroed so that a head attending only to each token itself counts as rank 0,
    not n. Half-precision maps are ranked in float32 (``matrix_rank`` has no half kernels).
    """
    maps = attention.to(torch.promote_types(attention.dtype, torch.float32), copy=True)
    maps.diagonal(dim1=-2, dim2=-1).zero_()
    return torch.linalg.matrix_rank(maps)


class AttentionRankMeter:
    """Ranks every decoder layer's attention maps during forward calls and keeps per-layer sums.

    The model must run eager attention (the only backend that returns the maps).
    """

    def __init__(self, model) -> None:
        self.model = model
        self.decoder_layers = model.model.language_model.layers
        self.mod_layers = set(mod_layer_indices(model))
        num_layers = len(self.decoder_layers)
        self.rank_sums = [0.0] * num_layers
        self.token_sums = [0] * num_layers
        self.samples = 0
        self._token_valid: torch.Tensor | None = None  # (batch, seq) bool, during a call
        self._routing = None  # the routing record, during a call

    @torch.inference_mode()
    def measure(self, inputs: dict[str, torch.Tensor]) -> None:
        """Run the model on one processor batch and add its samples to the sums."""
        self._token_valid = inputs["attention_mask"].bool()  # (batch, seq)
        hooks = [
            layer.self_attn.register_forward_hook(partial(self._rank_layer, index))
            for index, layer in enumerate(self.decoder_layers)
        ]
        try:
            with record_routing(self.model) as routing:
                self._routing = routing
                self.model(**inputs, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
            self._token_valid = self._routing = None
        self.samples += len(inputs["attention_mask"])

    def _token_slots(self, layer_index: int, queries: int) -> list[torch.Tensor]:
        """Per sample, the rows (and columns) of this layer's maps that hold its real tokens."""
        if layer_index not in self.mod_layers:
            return [row.nonzero().squeeze(-1) for row in self._token_valid]
        # a MoD layer's maps cover its kept tokens, which fill the first slots of every row
        kept = self._routing.layers[layer_index].keep_mask.sum(dim=1)  # (batch,)
        if int(kept.max()) != queries:
            raise RuntimeError(
                f"layer {layer_index}: {queries} attention rows but {int(kept.max())} kept tokens"
            )
        return [torch.arange(int(count)) for count in kept]

    def _rank_layer(self, layer_index: int, module, args, output) -> None:
        attention = output[1]  # (batch, heads, queries, keys)
        if attention is None:
            raise RuntimeError(
                "the attention module returned no weights; load the model with attn_implementation='eager'"
            )
        for sample, slots in enumerate(self._token_slots(layer_index, attention.shape[-2])):
            slots = slots.to(attention.device)
            maps = attention[sample][:, slots][:, :, slots]  # (heads, n, n)
            self.rank_sums[layer_index] += attention_rank(maps).float().mean().item()
            self.token_sums[layer_index] += len(slots)

    def aranks(self) -> list[float]:
        return [total / self.samples for total in self.rank_sums]

    def mean_tokens(self) -> list[float]:
        return [total / self.samples for total in self.token_sums]


# ---- the proposal -----------------------------------------------------------------------


def propose_layers(aranks: Sequence[float], dense_layers: int) -> tuple[list[int], list[int]]:
    """(dense, MoD) layer indices: the ``dense_layers`` highest-ARank layers stay dense.

    Ties go to the earlier layer, so the proposal is deterministic.
    """
    if not 0 <= dense_layers < len(aranks):
        raise UserError(
            f"--dense-layers {dense_layers} must be between 0 and {len(aranks) - 1}: "
            f"the model has {len(aranks)} decoder layers and at least one must become MoD"
        )
    by_rank = sorted(range(len(aranks)), key=lambda layer: (-aranks[layer], layer))
    dense = sorted(by_rank[:dense_layers])
    return dense, [layer for layer in range(len(aranks)) if layer not in dense]


# ---- the result file --------------------------------------------------------------------


# the keys every ARank result file has; the others are informative
RESULT_KEYS = ("model", "samples", "arank", "dense_layers", "mod_layers")


@dataclass
class ARankResult:
    """What ``pmod arank`` measured and proposes; saved as the "ARank result file" (JSON)."""

    model: str  # the checkpoint analysed
    samples: int
    arank: list[float]  # per decoder layer, mean over heads and samples
    dense_layers: list[int]  # proposed: the highest-ARank layers
    mod_layers: list[int]  # proposed: all the others
    tokens: list[float] = field(
        default_factory=list
    )  # per layer, mean n of the n x n maps (kept tokens in MoD layers)
    checkpoint_mod_layers: list[int] = field(
        default_factory=list
    )  # layers already MoD in the checkpoint
    dtype: str = ""  # precision of the attention maps
    skipped: int = 0  # samples of the data file passed over (no image, malformed conversation)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        except OSError as err:
            raise UserError(f"cannot write {path}: {err.strerror or err}") from None
        return path


def load_arank_result(path: str | Path) -> ARankResult:
    """Read an ARank result file written by ``pmod arank --save``; a UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"ARank result file {path} does not exist; write one with `pmod arank CHECKPOINT --data FILE --save {path}`"
        )
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} as JSON: {err}") from None
    missing = [key for key in RESULT_KEYS if not isinstance(values, dict) or key not in values]
    if missing:
        raise UserError(
            f"{path} is not an ARank result file (missing {', '.join(missing)}); write one with `pmod arank --save`"
        )
    if not isinstance(values["arank"], list) or not all(
        isinstance(v, int | float) for v in values["arank"]
    ):
        raise UserError(f"{path}: arank must be a list of numbers, one per decoder layer")
    num_layers = len(values["arank"])
    for key in ("dense_layers", "mod_layers", "checkpoint_mod_layers"):
        layers = values.get(key, [])
        if not isinstance(layers, list) or not all(
            isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < num_layers
            for layer in layers
        ):
            raise UserError(
                f"{path}: {key} must be a list of layer indices in 0..{num_layers - 1}, got {layers!r}"
            )
    known = {f.name for f in fields(ARankResult)}
    return ARankResult(**{key: value for key, value in values.items() if key in known})


def load_arank_layers(path: str | Path, num_layers: int | None = None) -> list[int]:
    """The MoD layers an ARank result file proposes (for ``PMoDConfig(mod_layers=...)``).

    ``num_layers``: the model the layers are for; a UserError if the file was measured on a model
    with another number of layers.
    """
    result = load_arank_result(path)
    if num_layers is not None and len(result.arank) != num_layers:
        raise UserError(
            f"{path} was measured on a {len(result.arank)}-layer model but this model has {num_layers} layers; "
            "run pmod arank on this model"
        )
    return sorted(result.mod_layers)


# ---- the run ----------------------------------------------------------------------------


def _check_counts(samples: int, batch_size: int, dense_layers: int) -> None:
    for flag, value, least in (
        ("--samples", samples, 1),
        ("--batch-size", batch_size, 1),
        ("--dense-layers", dense_layers, 0),
    ):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")


def measure_arank(
    checkpoint: str | Path,
    data: str | Path,
    *,
    image_folder: str | Path | None = None,
    samples: int = 16,
    batch_size: int = 4,
    dense_layers: int = 4,
    dtype: str = "fp32",  # the precision of the maps changes their numerical rank: explicit
    device: str | None = None,
    progress: bool = True,
) -> ARankResult:
    """Run ``checkpoint`` (plain HF or p-MoD, of any registered family) on ``samples`` image-question
    samples of ``data`` (a model that takes video: image- or video-question samples) and measure
    every layer's ARank; propose the MoD layers.
    """
    checkpoint, data = Path(resolve_name(checkpoint)), Path(resolve_name(data))
    image_folder = Path(resolve_name(image_folder)) if image_folder is not None else None
    _check_counts(samples, batch_size, dense_layers)
    dtype = parse_dtype(dtype)
    num_layers = read_num_layers(checkpoint)
    propose_layers([0.0] * num_layers, dense_layers)  # fails on a bad K before the model loads
    takes_video = family_for_model_type(read_model_type(checkpoint)).takes_video
    question_set = read_image_questions(data, image_folder, samples, videos=takes_video)
    device = resolve_device(device)
    model, processor = load_checkpoint(
        checkpoint, device=device, dtype=torch_dtype(dtype), attn_implementation="eager"
    )
    meter = AttentionRankMeter(model)
    _run_batches(meter, processor, question_set, batch_size, model.device, progress)
    aranks = meter.aranks()
    dense, mod = propose_layers(aranks, dense_layers)
    return ARankResult(
        model=str(checkpoint),
        samples=meter.samples,
        arank=aranks,
        dense_layers=dense,
        mod_layers=mod,
        tokens=meter.mean_tokens(),
        checkpoint_mod_layers=sorted(meter.mod_layers),
        dtype=str(model.dtype).removeprefix("torch."),
        skipped=question_set.skipped,
    )


def _run_batches(
    meter: AttentionRankMeter,
    processor,
    question_set: QuestionSet,
    batch_size: int,
    device,
    progress: bool,
) -> None:
    from ..progress import progress_bar

    questions = question_set.questions
    template = template_for_model(meter.model)
    # transient: an error midway leaves only its one line on stderr
    with progress_bar("samples", description="ARank", remaining=False, disable=not progress) as bar:
        task = bar.add_task("ARank", total=len(questions))
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            meter.measure(dict(prompt_inputs(processor, meter.model, batch, template)))
            bar.advance(task, len(batch))
