"""Talking to a checkpoint: answer questions about images, streamed, and say what each answer cost.

    session = ChatSession(model, processor, [image])
    answer = session.ask("What colour is the square?", on_text=print)
    efficiency_line(answer)     # "p-MoD: 0.36 TFLOPs (61.7 % of dense) · KV cache 1.2 MiB (56.3 %) · ..."

A session keeps the conversation: each question is asked with the earlier questions and answers in
front of it (the images belong to the first question), through the one prompt builder
(``data/prompts.py``), so ``pmod chat`` asks exactly what ``pmod eval`` asks. Costs are measured as
``pmod eval`` measures them (``measure.py``): prefill and end-to-end latency, the KV cache held
after prefill against the dense twin's, and TFLOPs of this prompt by the ``pmod flops`` formula.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from transformers import TextStreamer

from ..data.llava_data import read_image
from ..data.prompts import build_prompt, encode
from ..efficiency.flops import FlopsCount, count_flops_for_model
from ..efficiency.report import format_bytes, percent
from ..errors import UserError
from ..model import is_pmod_model
from ..model.families import family_for_model, template_for_model
from ..model.loading import load_checkpoint
from ..runtime import parse_dtype, resolve_device, torch_dtype
from .measure import PrefillProbe, prompt_counts

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class ChatAnswer:
    """One answer and what it cost."""

    text: str
    vision_tokens: int  # V: the images' own tokens (before a method like pool shortens the prompt)
    text_tokens: int  # T of the prompt
    generated_tokens: int
    prefill_s: float
    end_to_end_s: float
    kv_cache_bytes: int  # held after prefill
    dense_kv_cache_bytes: int  # the dense twin's for the same prompt
    flops: FlopsCount  # this prompt's prefill, with the dense twin as baseline
    is_pmod: bool


class _CallbackStreamer(TextStreamer):
    """Hands each piece of finished text to ``on_text`` as ``generate`` produces it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.started = False  # the answer's leading space (a word-initial token) is not printed

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.on_text(text)


class ChatSession:
    """A conversation about ``images`` with a loaded model (dense or p-MoD, any registered family)."""

    def __init__(
        self, model, processor, images: list, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ) -> None:
        self.model, self.processor, self.images = model, processor, list(images)
        self.max_new_tokens = max_new_tokens
        self.history: list[tuple[str, str]] = []
        self.template = template_for_model(model)
        self.family = family_for_model(model)

    def prompt(self, question: str) -> str:
        return build_prompt(self.processor, question, len(self.images), self.template, self.history)

    @torch.inference_mode()
    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> ChatAnswer:
        """Answer ``question`` greedily; ``on_text`` receives the answer piece by piece."""
        tokenizer = self.processor.tokenizer
        start = time.perf_counter()
        inputs = encode(self.processor, [self.prompt(question)], self.images, self.model)
        counts = prompt_counts(self.model, self.family, inputs)
        probe = PrefillProbe(self.model, self.model.device)
        probe.start(inputs["attention_mask"], counts.removed)
        try:
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
                streamer=_CallbackStreamer(tokenizer, on_text) if on_text is not None else None,
            )
        finally:
            probe.stop()
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        end_to_end = time.perf_counter() - start
        self.history.append((question, text))
        vision, text_tokens = counts.vision[0], counts.text[0]
        return ChatAnswer(
            text=text,
            vision_tokens=vision,
            text_tokens=text_tokens,
            generated_tokens=int(new_tokens.numel()),
            prefill_s=probe.prefill_s,
            end_to_end_s=end_to_end,
            kv_cache_bytes=probe.kv_bytes[0],
            dense_kv_cache_bytes=probe.dense_kv_bytes[0],
            flops=count_flops_for_model(
                self.model,
                vision_tokens=vision,
                text_tokens=text_tokens,
                vision_crops=counts.crops[0] if counts.crops else None,
            ),
            is_pmod=is_pmod_model(self.model),
        )


def efficiency_line(answer: ChatAnswer) -> str:
    """One line: TFLOPs and KV cache against the dense twin, latency, token counts."""
    flops = answer.flops
    kind = "p-MoD" if answer.is_pmod else "dense"
    return (
        f"{kind}: {flops.tflops:.3g} TFLOPs ({percent(flops.tflops / flops.baseline_tflops)} of dense) · "
        f"KV cache {format_bytes(answer.kv_cache_bytes)} "
        f"({percent(answer.kv_cache_bytes / answer.dense_kv_cache_bytes)} of dense) · "
        f"prefill {answer.prefill_s:.3f} s · {answer.end_to_end_s:.2f} s end to end · "
        f"prompt {answer.vision_tokens} vision + {answer.text_tokens} text tokens, {answer.generated_tokens} generated"
    )


def run_chat(
    checkpoint,
    images,
    question: str | None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device=None,
    dtype="auto",
) -> None:
    """``pmod chat``: one question, or a conversation read line by line from stdin (at a terminal:
    until an empty line or end of input). Answers stream to stdout; each efficiency line goes to
    stderr, so ``pmod chat ... > answer.txt`` keeps only the answer."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    pictures = [
        read_image(path) for path in images
    ]  # before the model loads: a bad path fails at once
    precision = torch_dtype(parse_dtype(dtype))
    model, processor = load_checkpoint(checkpoint, device=resolve_device(device), dtype=precision)
    session = ChatSession(model, processor, pictures, max_new_tokens)
    notes = Console(stderr=True, highlight=False)
    questions = [question] if question is not None else _read_questions(notes, sys.stdin)
    for text in questions:
        answer = session.ask(text, on_text=_print_piece)
        print(flush=True)
        notes.print(efficiency_line(answer), style="dim", soft_wrap=True)


def _print_piece(text: str) -> None:
    print(text, end="", flush=True)


def _read_questions(console, stdin):
    """Questions from a terminal (a prompt each, an empty line ends) or from a pipe (one a line)."""
    if stdin.isatty():
        while True:
            try:
                line = console.input("[bold]you>[/bold] ").strip()
            except EOFError:
                return
            if not line:
                return
            yield line
    else:
        for line in stdin:
            if line.strip():
                yield line.strip()
