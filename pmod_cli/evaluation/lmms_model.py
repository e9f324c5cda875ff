"""The lmms-eval model ``pmod``: any p-MoD or plain HF checkpoint directory of a registered family
(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision).

Registered through the entry point group ``lmms_eval.models`` (see pyproject.toml), so both
``pmod eval`` and lmms-eval's own command line find it:

    python -m lmms_eval --model pmod --model_args pretrained=DIR --tasks mme --batch_size 4

It generates in batches (left padding: a p-MoD model answers each sample of a batch as it would
alone), scores continuations for multiple-choice tasks (``loglikelihood``), takes a task's images
(PIL images) and videos (file paths, ``num_frames`` frames each, decoded with PyAV), and measures every
request (see ``measure.py``): ``model.measurements`` after a run, and lmms-eval's own
"throughput" summary gets the means.

Under ``torchrun`` / ``accelerate launch`` it runs data-parallel, as lmms-eval's own models do:
each process loads the model on its device (``cuda:LOCAL_RANK``, or the CPU with gloo), lmms-eval
hands each its share of the requests and gathers the results on process 0. The requests lmms-eval
adds to even out the processes' shares (``__padding_only__``) are answered without running the
model: they are not scored, and not measured. Process 0 shows a progress bar of its requests.

``method`` runs the checkpoint with another token-reduction method than its own routing
(``model/methods/``), spelt as ``pmod --method`` spells it with ``;`` between options (lmms-eval
splits model_args on commas): ``--model_args pretrained=DIR,method=fastv:layer=2;ratio=0.5``;
with ``match_tflops=true`` the method's knob (FastV's R, pool's N) is solved, on the first
requests, to cost what the checkpoint's p-MoD plan costs on them (in a multi-process run, on each
process's share).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.utils import Collator
from PIL import Image

from ..data.prompts import build_prompt, encode
from ..data.video import VideoError, read_frames
from ..efficiency.flops import count_flops, match_method
from ..errors import UserError
from ..model.families import family_for_model, template_for_model
from ..model.loading import load_checkpoint
from ..model.methods import MethodError, TokenMethod, method_from_dict, parse_method
from ..model.modeling import apply_method, is_pmod_model
from ..model.presets import shape_from_hf_config
from ..runtime import parse_dtype, torch_dtype
from .measure import MemoryMeter, PrefillProbe, SampleMeasurement, prompt_counts
from .registration import MODEL_NAME

DEFAULT_MAX_NEW_TOKENS = 256
# frames sampled from a task's video when neither model_args nor the checkpoint say (LLaVA-OneVision's)
DEFAULT_NUM_FRAMES = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class PMoDLmms(lmms):
    """lmms-eval model over ``pmod_cli.model.loading.load_checkpoint`` (dense or p-MoD)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str = 1,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        num_frames: int | str | None = None,
        max_batch_size: int | None = None,  # passed by lmms-eval; batches are fixed-size here
        method: str | TokenMethod | None = None,
        match_tflops: bool | str = False,
        **unexpected,
    ) -> None:
        super().__init__()
        dtype = _checked_model_args(unexpected, num_frames, batch_size, dtype)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self._join_processes()
        self.batch_size_per_gpu = int(batch_size)
        self.pretrained = str(pretrained)
        self.model, self.processor = load_checkpoint(
            pretrained,
            device=self._device,
            dtype=None if dtype == "auto" else torch_dtype(dtype),
            attn_implementation=attn_implementation,
        )
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation: prompts end at the same column
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        self.family = family_for_model(self.model)
        # as many frames as the checkpoint trained with (pmod sft saves data.video_frames with it)
        video_processor = getattr(self.processor, "video_processor", None)
        self.num_frames = int(
            num_frames or getattr(video_processor, "num_frames", None) or DEFAULT_NUM_FRAMES
        )
        self.fallback_template = template_for_model(self.model)
        matched = str(match_tflops).lower() in ("true", "1", "yes")
        self.method = _method_from_args(method, matched)
        self._match_pending = matched and self.method is not None and self.method.knob is not None
        self._apply_method_now()
        # kept apart: lmms-eval's evaluator deletes the model (lm.clean()) once requests are done
        self.model_config = self.model.config
        layers = self.model.config.text_config.num_hidden_layers
        self.retention_ratios = list(
            getattr(self.model, "retention_ratios", None) or [1.0] * layers
        )
        self.measurements: list[SampleMeasurement] = []
        self._warmed_up = False

    def _join_processes(self) -> None:
        """One of several processes (torchrun, accelerate launch): its rank, and its own GPU
        unless a device index was given (gloo between CPU processes)."""
        from accelerate import Accelerator

        on_cpu = self._device.type == "cpu"
        self.accelerator = Accelerator(cpu=on_cpu)  # sets up the process group
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if not on_cpu and self._device.index is None:
            self._device = self.accelerator.device

    @contextlib.contextmanager
    def _progress(self, kind: str, total: int):
        """A progress bar of this call's requests (process 0 only, on stderr); yields advance(n)."""
        if self.rank != 0 or total == 0:
            yield lambda n: None
            return
        from ..progress import progress_bar

        share = f" (process 0 of {self.world_size})" if self.world_size > 1 else ""
        with progress_bar() as progress:
            task = progress.add_task(f"{kind} requests{share}", total=total)
            yield lambda n: progress.advance(task, n)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> PMoDLmms:
        """lmms-eval's command line: ``--model_args`` and its own ``--batch_size`` / ``--device``
        (always passed); a key given in ``--model_args`` wins instead of clashing."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        given = {
            key: value
            for key, value in (additional_config or {}).items()
            if value is not None and key not in args
        }
        return cls(**args, **given)

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- the method -----------------------------------------------------------------------

    def _apply_method_now(self) -> None:
        """Install the method (a matched one once its setting is solved, see ``_settle_method``)."""
        if self.method is None:  # the checkpoint as saved
            return
        if self.method.needs_router and not is_pmod_model(self.model):
            raise ValueError(
                f"{self.pretrained} is a dense checkpoint: it has no trained routers for method {self.method.name} "
                "(evaluate it without a method, or with method dense)"
            )
        if not self._match_pending:
            apply_method(self.model, self.method)

    def _settle_method(self, contexts: list[str], first_visuals: list) -> None:
        """Solve a matched method's setting on these requests: at the vision tokens of the first
        request's images and the mean text tokens of all prompts, the setting whose count is
        closest to what the checkpoint's p-MoD plan costs there (a dense checkpoint: the
        released schedule, beta 0.5)."""
        if not self._match_pending:
            return
        self._match_pending = False
        if not first_visuals:
            raise ValueError("match_tflops needs requests with images to measure V on")
        inputs = self._encode([self.build_prompt(contexts[0], len(first_visuals))], [first_visuals])
        vision_tokens = int(self.family.vision_mask(inputs["input_ids"], self.model.config).sum())
        text_lengths = [
            len(self.tokenizer(self.build_prompt(context, 1))["input_ids"]) - 1
            for context in contexts
        ]
        text_tokens = round(sum(text_lengths) / len(text_lengths))
        # the p-MoD plan (fresh routers for a dense checkpoint)
        apply_method(self.model, method_from_dict(None))
        shape = shape_from_hf_config(self.model.config)
        ratios = self.model.retention_ratios
        crops = self._method_crops(inputs)
        options = dict(vision_tokens=vision_tokens, text_tokens=text_tokens, vision_crops=crops)
        target = count_flops(shape, ratios, **options).flops
        self.method = match_method(shape, ratios, self.method, target, **options)
        self.matched_at = {**options, "target_tflops": target / 1e12}
        apply_method(self.model, self.method)

    def _method_crops(self, inputs: dict) -> int | None:
        """The crops of these images where the method keeps its tokens by crop (VisionZip on
        LLaVA-NeXT); None: the count's own."""
        placeholders = self.method.image_placeholders(self.model, inputs)
        per_crop = self.method.prompt_tokens_per_image()
        return sum(placeholders) // per_crop if placeholders and per_crop else None

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ---- prompts --------------------------------------------------------------------------

    def build_prompt(self, context: str, num_images: int, num_videos: int = 0) -> str:
        """The user turn through the checkpoint's chat template (media first unless the text places them)."""
        return build_prompt(
            self.processor, context, num_images, self.fallback_template, num_videos=num_videos
        )

    def _visuals(self, doc_to_visual, doc_id: int, task: str, split: str) -> tuple[list, list]:
        """A request's (images, videos): PIL images as given, video files as ``num_frames`` frames."""
        if doc_to_visual is None:
            return [], []
        images, videos = [], []
        for visual in doc_to_visual(self.task_dict[task][split][doc_id]) or []:
            if isinstance(visual, str | Path) and Path(visual).suffix.lower() not in IMAGE_SUFFIXES:
                videos.append(self._video(Path(visual)))
            elif isinstance(visual, str | Path):
                with Image.open(visual) as opened:
                    images.append(opened.convert("RGB"))
            elif visual is not None:
                images.append(visual)
        return images, videos

    def _video(self, path: Path):
        if not self.family.takes_video:
            raise ValueError(
                f"{self.pretrained} is a {self.family.title} model, which takes no video ({path})"
            )
        try:
            return read_frames(path, self.num_frames)
        except VideoError as err:
            raise ValueError(f"cannot read the task's video {path}: {err}") from None

    def _encode(self, prompts: list[str], images: list, videos: list | None = None) -> dict:
        return encode(self.processor, prompts, images, self.model, videos=videos)

    def warm_up(self) -> None:
        """One short unmeasured generation, so the first measured request does not pay for
        first-call allocations and kernel selection."""
        if self._warmed_up:
            return
        self._warmed_up = True
        inputs = self._encode(
            [self.build_prompt("Warm up.", 1)], [[Image.new("RGB", (64, 64), (128, 128, 128))]]
        )
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )

    # ---- generate_until ----------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        real, padding = _split_padding(requests)
        answers = self._generate_real(real)
        return _with_padding(answers, padding, len(requests), "")

    def _generate_real(self, requests: list[Instance]) -> list[str]:
        if not requests:
            return []
        if self._match_pending:
            first = requests[0].args
            self._settle_method(
                [r.args[0] for r in requests],
                self._visuals(first[2], first[3], first[4], first[5])[0],  # its images
            )
        self.warm_up()
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda args: (
                -len(args[0]),
                args[0],
            ),  # longest first: little padding per batch
            group_fn=lambda args: {
                "__task": args[4],
                **args[1],
            },  # one task and one set of kwargs a batch
            grouping=True,
        )
        answers: list[str] = []
        measured: list[SampleMeasurement] = []
        with self._progress("generate_until", len(requests)) as advance:
            for batch in collator.get_batched(n=self.batch_size):
                batch_answers, batch_measured = self._generate_batch(batch)
                answers.extend(batch_answers)
                measured.extend(batch_measured)
                for args, answer in zip(batch, batch_answers, strict=True):
                    self.cache_hook.add_partial("generate_until", (args[0], args[1]), answer)
                advance(len(batch))
        self.measurements.extend(measured)
        _log_to_lmms_eval(measured, len(requests))
        return collator.get_original(answers)

    def _generate_batch(self, batch: list[tuple]) -> tuple[list[str], list[SampleMeasurement]]:
        contexts, all_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*batch, strict=True)
        until, generation = _generation_options(all_kwargs[0])
        start = time.perf_counter()
        with MemoryMeter(self._device) as memory:
            inputs = self._batch_inputs(contexts, doc_to_visuals, doc_ids, tasks, splits)
            counts = prompt_counts(self.model, self.family, inputs)
            probe = PrefillProbe(self.model, self._device)
            probe.start(inputs["attention_mask"], counts.removed)
            try:
                with torch.inference_mode():
                    output = self.model.generate(
                        **inputs,
                        pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=self.tokenizer.eos_token_id,
                        use_cache=True,
                        **generation,
                    )
            finally:
                probe.stop()
            new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (batch, generated)
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers = [_cut_at_stop(text, until) for text in texts]
        end_to_end = time.perf_counter() - start

        generated = _generated_counts(new_tokens, self.tokenizer.eos_token_id)
        measured = [
            SampleMeasurement(
                task=tasks[i],
                doc_id=int(doc_ids[i]),
                request="generate_until",
                batch_size=len(batch),
                vision_tokens=counts.vision[i],
                text_tokens=counts.text[i],
                prefix_text_tokens=counts.prefix_text[i],
                vision_crops=counts.crops[i] if counts.crops else None,
                prefill_s=probe.prefill_s,
                end_to_end_s=end_to_end,
                kv_cache_bytes=probe.kv_bytes[i],
                dense_kv_cache_bytes=probe.dense_kv_bytes[i],
                peak_memory_bytes=memory.peak_bytes,
                memory_kind=memory.kind,
                generated_tokens=generated[i],
            )
            for i in range(len(batch))
        ]
        return answers, measured

    def _batch_inputs(self, contexts, doc_to_visuals, doc_ids, tasks, splits) -> dict:
        """A batch's prompts and their images and videos, encoded."""
        prompts, images, videos = [], [], []
        for context, doc_to_visual, doc_id, task, split in zip(
            contexts, doc_to_visuals, doc_ids, tasks, splits, strict=True
        ):
            sample_images, sample_videos = self._visuals(doc_to_visual, doc_id, task, split)
            prompts.append(self.build_prompt(context, len(sample_images), len(sample_videos)))
            # per prompt: OneVision lays out one image and several differently
            images.append(sample_images)
            videos.extend(sample_videos)
        return self._encode(prompts, images, videos)

    # ---- loglikelihood -----------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request: (negative log-likelihood of the continuation, is it the greedy one).

        lmms-eval's multiple-choice scoring picks the choice with the LOWEST value (its models
        return a loss), so the first element is -sum(log p(continuation)), not the log-likelihood
        its base-class docstring describes. Each pair travels inside a ``GenerationResult``: the
        0.7 evaluator turns any other non-string output into its ``str()``.
        """
        real, padding = _split_padding(requests)
        if self._match_pending and real:
            first = real[0].args
            visuals = (
                self._visuals(first[2], first[3], first[4], first[5])[0] if len(first) > 2 else []
            )
            self._settle_method([r.args[0] for r in real], visuals)
        if real:
            self.warm_up()
        results = []
        measured = []
        with self._progress("loglikelihood", len(real)) as advance:
            for request in real:
                nll, greedy, measurement = self._score(request.args)
                results.append(GenerationResult(text=(nll, greedy)))
                measured.append(measurement)
                self.cache_hook.add_partial("loglikelihood", request.args[:2], (nll, greedy))
                advance(1)
        self.measurements.extend(measured)
        _log_to_lmms_eval(measured, len(real))
        return _with_padding(results, padding, len(requests), GenerationResult(text=(0.0, False)))

    def _score(self, args: tuple) -> tuple[float, bool, SampleMeasurement]:
        if len(args) == 2:  # an unconditional request (acc_mutual_info): no image, no template
            context, continuation = args
            doc_to_target = doc_to_visual = None
            doc_id, task, split = -1, "", ""
        else:
            context, doc_to_target, doc_to_visual, doc_id, task, split = args
            continuation = (
                doc_to_target
                if isinstance(doc_to_target, str)
                else doc_to_target(self.task_dict[task][split][doc_id])
            )
        start = time.perf_counter()
        with MemoryMeter(self._device) as memory:
            if doc_to_visual is None:
                prompt, visuals = context, None
            else:
                images, videos = self._visuals(doc_to_visual, doc_id, task, split)
                prompt, visuals = (
                    self.build_prompt(context, len(images), len(videos)),
                    (images, videos),
                )
            inputs, context_length = self._encode_continuation(prompt, continuation, visuals)
            counts = prompt_counts(self.model, self.family, inputs)
            probe = PrefillProbe(self.model, self._device)
            probe.start(inputs["attention_mask"], counts.removed)
            try:
                with torch.inference_mode():
                    logits = self.model(**inputs, use_cache=True).logits  # (1, seq, vocab)
            finally:
                probe.stop()
            # the token at position p is predicted by the logits at p - 1
            predicting = (
                logits[0, context_length - 1 : -1].float().log_softmax(dim=-1)
            )  # (n, vocab)
            target = inputs["input_ids"][0, context_length:]
            log_likelihood = predicting.gather(1, target[:, None]).sum().item()
            greedy = bool((predicting.argmax(dim=-1) == target).all())
        end_to_end = time.perf_counter() - start
        measurement = SampleMeasurement(
            task=task,
            doc_id=int(doc_id),
            request="loglikelihood",
            batch_size=1,
            vision_tokens=counts.vision[0],
            text_tokens=counts.text[0],
            prefix_text_tokens=counts.prefix_text[0],
            vision_crops=counts.crops[0] if counts.crops else None,
            prefill_s=probe.prefill_s,
            end_to_end_s=end_to_end,
            kv_cache_bytes=probe.kv_bytes[0],
            dense_kv_cache_bytes=probe.dense_kv_bytes[0],
            peak_memory_bytes=memory.peak_bytes,
            memory_kind=memory.kind,
        )
        return -log_likelihood, greedy, measurement

    def _encode_continuation(
        self, prompt: str, continuation: str, visuals: tuple[list, list] | None
    ) -> tuple[dict, int]:
        """``prompt + continuation`` encoded as one text (through the processor with ``visuals``,
        (images, videos), plain tokenizer when None), and how many of its tokens are the prompt's.

        Encoded apart, a continuation can tokenize differently than it does after the prompt
        (SentencePiece: " A" alone is ["▁", "▁A"], after "Answer:" it is ["▁A"]). So, as
        lm-evaluation-harness does, the whole text is encoded and the continuation is what follows
        the prompt's own tokens; spaces ending the prompt belong to the continuation.
        """
        spaces = len(prompt) - len(prompt.rstrip())
        if spaces:
            prompt, continuation = prompt[:-spaces], prompt[-spaces:] + continuation
        # the continuation's tokens, counted on the text (image tokens expand inside the prompt)
        whole_length = len(self.tokenizer(prompt + continuation)["input_ids"])
        continuation_length = max(0, whole_length - len(self.tokenizer(prompt)["input_ids"]))
        if visuals is None:  # an unconditional request: plain text, no template
            inputs = dict(
                self.tokenizer([prompt + continuation], return_tensors="pt").to(self._device)
            )
        else:
            images, videos = visuals
            inputs = dict(self._encode([prompt + continuation], [images], videos))
        context_length = inputs["input_ids"].shape[1] - continuation_length
        if context_length == 0:  # something must predict the first token
            start_id = (
                self.tokenizer.bos_token_id
                if self.tokenizer.bos_token_id is not None
                else self.tokenizer.eos_token_id
            )
            start = torch.tensor([[start_id]], dtype=inputs["input_ids"].dtype, device=self._device)
            inputs["input_ids"] = torch.cat([start, inputs["input_ids"]], dim=1)
            context_length = 1
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs, context_length

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"the {MODEL_NAME} model does not run multi-round tasks")


def _checked_model_args(unexpected: dict, num_frames, batch_size, dtype: str) -> str:
    """The parsed dtype, once the model_args are known and in range (lmms-eval reports bad
    model_args as ValueError)."""
    if unexpected:
        raise ValueError(
            f"unknown model_args for {MODEL_NAME}: {', '.join(sorted(unexpected))}; known: pretrained, device, "
            "batch_size, dtype, attn_implementation, num_frames, method (e.g. method=fastv:layer=2;ratio=0.5), "
            "match_tflops"
        )
    if num_frames is not None and int(num_frames) < 1:
        raise ValueError(f"num_frames must be a whole number >= 1, got {num_frames!r}")
    if str(batch_size) == "auto" or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    try:
        return parse_dtype(dtype, flag="dtype")
    except UserError as err:
        raise ValueError(str(err)) from None


def _method_from_args(method, matched: bool) -> TokenMethod | None:
    """The method asked for in model_args (lmms-eval's command line passes a string, pmod's own
    runs a TokenMethod), None: the checkpoint as saved."""
    if method is None or isinstance(method, TokenMethod):
        return method
    try:
        return parse_method(str(method), matched)
    except MethodError as err:  # lmms-eval reports bad model_args as ValueError
        raise ValueError(f"method={method}: {err}") from None


def _generation_options(task_kwargs: dict) -> tuple[list[str], dict]:
    """A task's generation kwargs as (stop strings, ``generate`` options); its other kwargs (e.g.
    image_aspect_ratio) are for other models."""
    until = task_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    options = {
        "max_new_tokens": int(task_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "num_beams": int(task_kwargs.get("num_beams") or 1),
        "do_sample": False,
    }
    if float(task_kwargs.get("temperature") or 0) > 0:
        options.update(
            do_sample=True,
            temperature=float(task_kwargs["temperature"]),
            top_p=task_kwargs.get("top_p"),
        )
    return until, options


def _split_padding(requests: list[Instance]) -> tuple[list[Instance], set[int]]:
    """(the real requests, the positions of lmms-eval's padding-only ones)."""
    padding = {
        i
        for i, request in enumerate(requests)
        if (getattr(request, "metadata", None) or {}).get("__padding_only__")
    }
    return [r for i, r in enumerate(requests) if i not in padding], padding


def _with_padding(answers: list, padding: set[int], total: int, filler) -> list:
    """The real answers back in the requests' order, ``filler`` where lmms-eval padded."""
    real = iter(answers)
    return [filler if i in padding else next(real) for i in range(total)]


def _cut_at_stop(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _generated_counts(new_tokens: torch.Tensor, eos_id: int | None) -> list[int]:
    """Tokens generated per sample, up to and including its end-of-sequence token (a sample
    that ends early is padded after it)."""
    rows = new_tokens.tolist()
    return [row.index(eos_id) + 1 if eos_id in row else len(row) for row in rows]


def _log_to_lmms_eval(measured: list[SampleMeasurement], num_requests: int) -> None:
    """Means of this call into lmms-eval's own "throughput" summary (its results JSON)."""
    if not measured:
        return
    elapsed = sum(m.end_to_end_s / m.batch_size for m in measured)  # wall time of the call
    generated = sum(m.generated_tokens for m in measured)
    dense_kv = sum(m.dense_kv_cache_bytes for m in measured)
    log_metrics(
        total_elapsed_time=elapsed,
        total_gen_tokens=generated,
        avg_speed=generated / elapsed if elapsed > 0 else 0.0,
        additional_metrics={
            "total_requests": num_requests,
            "prefill_latency_s": sum(m.prefill_s for m in measured) / len(measured),
            "end_to_end_latency_s": sum(m.end_to_end_s for m in measured) / len(measured),
            "kv_cache_bytes": sum(m.kv_cache_bytes for m in measured) / len(measured),
            "kv_cache_vs_dense": sum(m.kv_cache_bytes for m in measured) / dense_kv
            if dense_kv
            else 1.0,
            "peak_memory_bytes": max(m.peak_memory_bytes for m in measured),
        },
    )
