"""What the demo page asks of the model, without the page: one request, streamed, with its routing.

    engine = DemoEngine(model, processor, select_methods())
    for update in engine.stream(image, "What colour is the square?", "pmod"):
        ...  # str: the answer so far; MethodRun: the finished answer, its costs, its routing

A request is answered by ``ChatSession.ask`` (the prompt builder, greedy generation and the
measurements of ``pmod chat``) inside ``record_routing``, so the kept patches shown are those of
that very answer's prefill, read by ``visualization.selection`` as ``pmod visualize`` reads them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from ..evaluation.chat import DEFAULT_MAX_NEW_TOKENS, ChatAnswer, ChatSession
from ..model.routing import record_routing
from ..visualization.patches import patch_boxes_for
from ..visualization.selection import TokenSelection, selection_from_routing
from .methods import DemoMethod


@dataclass
class MethodRun:
    """One method's finished answer to a request."""

    method: DemoMethod
    answer: ChatAnswer
    selection: TokenSelection  # the prefill's kept tokens per layer (a dense layer keeps all)


@dataclass
class _Finished:
    answer: ChatAnswer
    prefill: dict


@dataclass
class _Failed:
    error: BaseException


class DemoEngine:
    """A loaded p-MoD model and the model each method runs (built once, sharing its weights)."""

    def __init__(
        self,
        model,
        processor,
        methods: Sequence[DemoMethod],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        self.processor = processor
        self.methods = list(methods)
        self.max_new_tokens = max_new_tokens
        self.models = {method.name: method.build(model) for method in self.methods}
        self.ratios = list(model.retention_ratios)
        self._lock = threading.Lock()  # one generation at a time: latencies stay honest

    def method(self, name: str) -> DemoMethod:
        return next(method for method in self.methods if method.name == name)

    def stream(self, image: Image.Image, question: str, name: str) -> Iterator[str | MethodRun]:
        """Answer ``question`` about ``image`` as method ``name``: the answer so far after each
        new piece, then the ``MethodRun``."""
        image = image.convert("RGB")
        model = self.models[name]
        updates: queue.Queue = queue.Queue()

        def answer() -> None:
            # record_routing's context lives in this thread: generation runs here
            try:
                session = ChatSession(model, self.processor, [image], self.max_new_tokens)
                with record_routing(model) as routing:
                    result = session.ask(question, on_text=updates.put)
                updates.put(_Finished(result, routing.calls[0] if routing.calls else {}))
            except BaseException as err:  # handed to the caller's thread
                updates.put(_Failed(err))

        with self._lock:
            worker = threading.Thread(target=answer, name=f"pmod-demo-{name}", daemon=True)
            worker.start()
            try:
                yield from self._relay(updates, model, image, name)
            finally:
                worker.join()

    def _relay(self, updates: queue.Queue, model, image: Image.Image, name: str):
        text = ""
        while True:
            update = updates.get()
            if isinstance(update, str):
                text += update
                yield text.lstrip()
            elif isinstance(update, _Failed):
                raise update.error
            else:
                boxes = patch_boxes_for(self.processor, model.config, image.height, image.width)
                selection = selection_from_routing(
                    model, image, boxes, update.prefill, update.answer.text
                )
                yield MethodRun(self.method(name), update.answer, selection)
                return
