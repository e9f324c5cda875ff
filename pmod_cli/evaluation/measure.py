"""What `pmod eval` measures per sample while lmms-eval runs the model: time to first token,
end-to-end latency, the KV cache actually held after prefill, and peak memory.

- prefill latency: from the start of ``generate`` to the end of its first forward pass (the
  prefill: vision tower, projector and every decoder layer over the prompt) = time to first
  token. With a batch, every sample of the batch waited that long: a sample's latency is its
  batch's (divide by the batch size for time per sample of throughput).
- end-to-end latency: preprocessing (processor) + generation + decoding of the batch.
- KV cache: read from the real cache right after prefill (``kv_cache_lengths``), per sample and
  without the left-padding slots of a batch; at batch 1 it equals ``kv_cache_bytes`` of the cache.
  The dense twin holds T + V entries in every layer for the same prompt. With beam search a
  sample holds one copy per beam (so does its dense twin).
- peak memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` during the batch (weights
  included); on CPU the peak resident set size sampled every 2 ms during the batch minus the RSS
  before it (the growth inference causes; weights excluded).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import psutil
import torch

from ..model.cache import PMoDCacheLayer, kv_cache_lengths

MEMORY_KINDS = {
    "cuda": "CUDA peak allocated during the batch (weights included)",
    "cpu": "peak RSS growth during the batch over the RSS before it (CPU, sampled every 2 ms)",
}


@dataclass
class SampleMeasurement:
    """One lmms-eval request as it ran."""

    task: str
    doc_id: int
    request: str  # "generate_until" | "loglikelihood"
    batch_size: int
    vision_tokens: int  # V: image-feature positions in the prompt
    text_tokens: int  # T: every other real token of the prompt
    prefix_text_tokens: int  # of T, those up to the last image token
    prefill_s: float
    end_to_end_s: float
    kv_cache_bytes: int  # K and V this sample holds after prefill
    dense_kv_cache_bytes: int  # the dense twin's: (T + V) entries in every layer
    peak_memory_bytes: int
    memory_kind: str  # "cuda" | "cpu", see MEMORY_KINDS
    generated_tokens: int = 0
    vision_crops: int | None = None  # crops through the tower, where a method keeps so many a crop

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PromptCounts:
    """Per sample of a batch: V (the images' vision tokens as the dense model sees them), T, the
    text tokens up to the last image token and, where the method shortens the prompt (pool,
    VisionZip), the vision tokens it took out and the crops of the sample's images."""

    vision: list[int]
    text: list[int]
    prefix_text: list[int]
    removed: list[int] | None = None
    crops: list[int] | None = None


def prompt_counts(model, family, inputs: dict) -> PromptCounts:
    """Per sample of an encoded batch: V, T and the prefix text (``_token_counts``); where the
    model's method shortens the prompt (pool, VisionZip), V is the images' vision tokens as the
    dense model sees them, with the tokens taken out and the images' crops."""
    placeholders, text, prefix_text = _token_counts(
        inputs, family.vision_mask(inputs["input_ids"], model.config)
    )
    shortened = _shortened(model, family, inputs, placeholders)
    if shortened is None:
        return PromptCounts(placeholders, text, prefix_text)
    removed, crops = shortened
    vision = [n + away for n, away in zip(placeholders, removed, strict=True)]
    return PromptCounts(vision, text, prefix_text, removed, crops)


def _shortened(model, family, inputs: dict, placeholders: list[int]) -> tuple[list, list] | None:
    """Per sample, where the model's method shortens the prompt: the vision tokens it took out
    (its images' own count less the placeholders left) and the crops its images went through the
    tower as (one per image, a LLaVA-NeXT image's anyres crops); None otherwise."""
    method = getattr(model, "token_method", None)
    per_crop = method.prompt_tokens_per_image() if method is not None else None
    if per_crop is None:
        return None
    own = family.vision_token_groups(model.config, inputs)[0][1]  # per image, as processed
    kept = method.image_placeholders(model, inputs) or [per_crop] * len(own)
    images = iter(zip(own, kept, strict=True))
    removed = []
    for count in placeholders:  # a sample's images are the next ones its placeholders hold
        own_tokens = held = 0
        while held < count:
            image_own, image_kept = next(images)
            own_tokens, held = own_tokens + image_own, held + image_kept
        removed.append(own_tokens - count)
    return removed, [count // per_crop for count in placeholders]


def _token_counts(
    inputs: dict, vision_mask: torch.Tensor
) -> tuple[list[int], list[int], list[int]]:
    """Per sample: V (image-feature positions), T (the other real tokens) of the prompt, and the
    text tokens up to the last image token (those compete too when a model routes all tokens)."""
    real = inputs["attention_mask"].bool()
    is_image = vision_mask & real
    vision = is_image.sum(dim=1)
    text = real.sum(dim=1) - vision
    index = torch.arange(real.shape[1], device=real.device).expand_as(real)
    last_image = torch.where(is_image, index, -1).max(dim=1).values  # (batch,)
    prefix_text = (real & ~is_image & (index <= last_image[:, None])).sum(dim=1)
    return vision.tolist(), text.tolist(), prefix_text.tolist()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak memory of the code run inside ``with MemoryMeter(device) as meter:``; see MEMORY_KINDS."""

    interval_s = 0.002

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.kind = "cuda" if self.device.type == "cuda" else "cpu"
        self.peak_bytes = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryMeter:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._baseline = self._process.memory_info().rss
            self._highest = self._baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._highest = max(self._highest, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self._highest = max(self._highest, self._process.memory_info().rss)
            self.peak_bytes = self._highest - self._baseline


def held_kv_bytes(
    cache, attention_mask: torch.Tensor, pooled_away: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """Per sample: (K/V bytes it holds in ``cache``, bytes its dense twin would hold).

    ``pooled_away``: per sample, vision tokens a method removed from the prompt (pool,
    VisionZip); the dense twin holds them too.

    A p-MoD layer's cache knows which of its slots are real; a dense layer stores every position
    of the (left-padded) batch, so the sample's padding is taken off. With beam search the cache
    has one row per beam (``generate`` repeats each sample num_beams times, beams of a sample
    adjacent): a sample holds all its beams' rows, and so does its dense twin.
    """
    real_tokens = attention_mask.sum(dim=1).tolist()  # (batch,): T + V per sample
    padding = [attention_mask.shape[1] - count for count in real_tokens]
    dense_tokens = [
        count + (pooled_away[i] if pooled_away else 0) for i, count in enumerate(real_tokens)
    ]
    held = [0] * len(real_tokens)
    dense = [0] * len(real_tokens)
    for layer, lengths in zip(cache.layers, kv_cache_lengths(cache), strict=True):
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        if len(lengths) % len(real_tokens):
            raise ValueError(
                f"the cache holds {len(lengths)} rows for a batch of {len(real_tokens)} samples"
            )
        beams = len(lengths) // len(real_tokens)
        # one cached token: K and V over all key/value heads
        entry_bytes = 2 * keys.shape[1] * keys.shape[3] * keys.element_size()
        for row, length in enumerate(lengths):
            sample = row // beams
            entries = length if isinstance(layer, PMoDCacheLayer) else length - padding[sample]
            held[sample] += entries * entry_bytes
            dense[sample] += dense_tokens[sample] * entry_bytes
    return held, dense


class PrefillProbe:
    """Records the end time and the cache of the first forward pass of ``model`` after ``start()``."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = torch.device(device)
        self._handle = None

    def start(self, attention_mask: torch.Tensor, pooled_away: list[int] | None = None) -> None:
        self.attention_mask = attention_mask
        self.pooled_away = pooled_away
        self.kv_bytes: list[int] | None = None
        self.dense_kv_bytes: list[int] | None = None
        self.prefill_end: float | None = None
        self._handle = self.model.register_forward_hook(self._after_forward)
        _synchronize(self.device)
        self.start_time = time.perf_counter()

    def _after_forward(self, module, args, output) -> None:
        if self.prefill_end is not None:
            return
        _synchronize(self.device)
        self.prefill_end = time.perf_counter()
        # transformers >= 5.24 names it "cache"; earlier versions "past_key_values"
        cache = next((output[key] for key in ("cache", "past_key_values") if key in output), None)
        if cache is not None:  # read now: decoding steps append to it
            self.kv_bytes, self.dense_kv_bytes = held_kv_bytes(
                cache, self.attention_mask, self.pooled_away
            )
        self._handle.remove()

    @property
    def prefill_s(self) -> float:
        return self.prefill_end - self.start_time

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
