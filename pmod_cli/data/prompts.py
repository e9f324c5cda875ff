"""One prompt builder for inference: the text a checkpoint answers a question about its images with.

``pmod eval``, ``pmod visualize``, ``pmod arank`` and flops calibration all build prompts here, so a
layer routes the same prompt in every command, and the prompt is the one the model trained on:

1. the processor's chat template (llava-hf checkpoints and those trained by ``pmod sft`` save one);
2. else the tokenizer's chat template;
3. else the family's conversation template (``data/templates.py``; LLaVA-1.5's ``vicuna_v1``).

Images go first, as in training, unless the text already places them with image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from .templates import IMAGE_PLACEHOLDER, Turn, get_template


def build_prompt(
    processor,
    text: str,
    num_images: int = 1,
    fallback_template: str = "vicuna_v1",
    history: Sequence[tuple[str, str]] = (),
) -> str:
    """The user turn ``text`` with ``num_images`` images, ending where the assistant's answer starts.

    ``history`` holds earlier (question, answer) turns of the same conversation; the images belong
    to its first question (or to ``text`` when there is no history).
    """
    image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    questions = [question for question, _ in history] + [text]
    if getattr(processor, "chat_template", None):
        # llava-hf templates render content items and drop a plain string: image tokens placed in
        # the text become image items where they stand
        messages = []
        for index, question in enumerate(questions):
            messages.append(
                {
                    "role": "user",
                    "content": _content(question, image_token, num_images if index == 0 else 0),
                }
            )
            if index < len(history):
                messages.append(
                    {"role": "assistant", "content": [{"type": "text", "text": history[index][1]}]}
                )
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    questions[0] = _with_image_tokens(questions[0], image_token, num_images)
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(tokenizer, "chat_template", None):
        messages = []
        for index, question in enumerate(questions):
            messages.append({"role": "user", "content": question})
            if index < len(history):
                messages.append({"role": "assistant", "content": history[index][1]})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    template = get_template(fallback_template)
    if not history:
        return template.generation_prompt(questions[0])
    # the formatted conversation up to where the last reply would start
    turns = []
    for index, question in enumerate(questions):
        turns.append(Turn("user", question))
        turns.append(Turn("assistant", history[index][1] if index < len(history) else ""))
    pieces = template.format(turns, getattr(tokenizer, "eos_token", None) or "")
    last_reply = max(index for index, piece in enumerate(pieces) if piece.is_target)
    return "".join(piece.text for piece in pieces[:last_reply])


def _with_image_tokens(text: str, image_token: str, num_images: int) -> str:
    """Images first, as in training, unless the text places them itself."""
    return text if image_token in text else f"{image_token}\n" * num_images + text


def _content(text: str, image_token: str, num_images: int) -> list[dict]:
    if image_token in text:
        return content_items(text, image_token)
    return [{"type": "image"}] * num_images + [{"type": "text", "text": text}]


def content_items(text: str, image_token: str) -> list[dict]:
    """``"<image>\\nWhat is it?"`` -> ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]``:
    image items where the text put its image tokens; the template supplies the separators."""
    items: list[dict] = []
    for index, part in enumerate(text.split(image_token)):
        if index:
            items.append({"type": "image"})
        if part.strip():
            items.append({"type": "text", "text": part.strip()})
    return items


def encode(processor, prompts: list[str], images: list, model, padding: bool = True) -> dict:
    """Processor outputs for ``prompts`` and their ``images``, on the model's device, with the
    pixel values in the model's dtype; for a model that pools its vision tokens (the ``pool``
    method), with each image's placeholders cut to the pooled count."""
    inputs = processor(
        text=prompts, images=images or None, padding=padding, return_tensors="pt"
    ).to(model.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    method = getattr(model, "token_method", None)
    if method is not None and method.name == "pool":
        from ..model.methods import pool_image_placeholders

        tokenizer = processor.tokenizer
        inputs = pool_image_placeholders(
            inputs,
            model.config.image_token_id,
            method.pool_tokens,
            tokenizer.pad_token_id,
            tokenizer.padding_side,
        )
    return inputs
