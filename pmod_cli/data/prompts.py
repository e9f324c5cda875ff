"""One prompt builder for inference: the text a checkpoint answers a question about its images with.

``pmod eval``, ``pmod visualize``, ``pmod arank`` and flops calibration all build prompts here, so a
layer routes the same prompt in every command, and the prompt is the one the model trained on:

1. the processor's chat template (llava-hf checkpoints and those trained by ``pmod sft`` save one);
2. else the tokenizer's chat template;
3. else the family's conversation template (``data/templates.py``; LLaVA-1.5's ``vicuna_v1``).

Images go first, as in training, unless the text already places them with image tokens.
"""

from __future__ import annotations

from .templates import IMAGE_PLACEHOLDER, get_template


def build_prompt(
    processor, text: str, num_images: int = 1, fallback_template: str = "vicuna_v1"
) -> str:
    """The user turn ``text`` with ``num_images`` images, ending where the assistant's answer starts."""
    image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    placed = image_token in text  # the caller placed its images itself
    if getattr(processor, "chat_template", None):
        # llava-hf templates render content items and drop a plain string: the text's image tokens
        # become image items where they stand
        if placed:
            content = content_items(text, image_token)
        else:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    question = text if placed else f"{image_token}\n" * num_images + text
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return get_template(fallback_template).generation_prompt(question)


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
