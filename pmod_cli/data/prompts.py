"""One prompt builder: the text a checkpoint answers a question about its images and videos with.

``pmod eval``, ``pmod visualize``, ``pmod arank`` and flops calibration all build prompts here, so a
layer routes the same prompt in every command, and the prompt is the one the model trained on:

1. the processor's chat template (llava-hf checkpoints and those trained by ``pmod sft`` save one);
2. else the tokenizer's chat template;
3. else the family's conversation template (``data/templates.py``; LLaVA-1.5's ``vicuna_v1``).

Images go first, then videos, as in training, unless the text already places them with
``<image>`` / ``<video>`` tokens. Training with ``data.template = "chat_template"`` renders its
conversations through the same chat template (``chat_template_pieces``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..model.families import family_for_processor
from ..model.methods import cut_image_placeholders
from .templates import (
    CHAT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    ConversationError,
    Piece,
    Turn,
    get_template,
)

__all__ = ["CHAT_TEMPLATE", "build_prompt", "chat_template_pieces", "content_items", "encode"]


def build_prompt(
    processor,
    text: str,
    num_images: int = 1,
    fallback_template: str = "vicuna_v1",
    history: Sequence[tuple[str, str]] = (),
    *,
    num_videos: int = 0,
) -> str:
    """The user turn ``text`` with ``num_images`` images and ``num_videos`` videos, ending where the
    assistant's answer starts.

    ``history`` holds earlier (question, answer) turns of the same conversation; the images and
    videos belong to its first question (or to ``text`` when there is no history).
    """
    tokens = _media_tokens(processor)
    questions = [question for question, _ in history] + [text]
    if getattr(processor, "chat_template", None):
        # llava-hf templates render content items and drop a plain string: media tokens placed in
        # the text become image / video items where they stand
        messages = []
        for index, question in enumerate(questions):
            media = (num_images, num_videos) if index == 0 else (0, 0)
            messages.append({"role": "user", "content": _content(question, tokens, *media)})
            if index < len(history):
                messages.append(
                    {"role": "assistant", "content": [{"type": "text", "text": history[index][1]}]}
                )
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    questions[0] = _with_media_tokens(questions[0], tokens, num_images, num_videos)
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


def _placed(text: str, tokens: dict[str, str]) -> bool:
    """Whether the caller placed its images / videos in the text itself."""
    return any(token in text for token in tokens.values())


def _with_media_tokens(text: str, tokens: dict[str, str], num_images: int, num_videos: int) -> str:
    """Images first, then videos, as in training, unless the text places them itself."""
    if _placed(text, tokens):
        return text
    return f"{tokens['image']}\n" * num_images + f"{tokens['video']}\n" * num_videos + text


def _content(text: str, tokens: dict[str, str], num_images: int, num_videos: int) -> list[dict]:
    if _placed(text, tokens):
        return content_items(text, tokens["image"], tokens["video"])
    media = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
    return media + [{"type": "text", "text": text}]


def content_items(text: str, image_token: str, video_token: str = VIDEO_PLACEHOLDER) -> list[dict]:
    """``"<image>\\nWhat is it?"`` -> ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]``:
    image / video items where the text put its tokens; the template supplies the separators."""
    kinds = {image_token: "image", video_token: "video"}
    items: list[dict] = []
    for part in re.split(f"({re.escape(image_token)}|{re.escape(video_token)})", text):
        if part in kinds:
            items.append({"type": kinds[part]})
        elif part.strip():
            items.append({"type": "text", "text": part.strip()})
    return items


def chat_template_pieces(processor, turns: list[Turn]) -> list[Piece]:
    """A conversation rendered by the checkpoint's own chat template, its assistant replies marked
    as targets (``data.template = "chat_template"``).

    A reply's span is what rendering the conversation up to it adds to rendering the conversation
    before it with the generation prompt: the reply and the template's end-of-turn marker. A
    template that does not render a conversation's beginning as a prefix of the whole is a
    ConversationError (then name a conversation template instead).
    """
    renderer = _chat_renderer(processor)
    if renderer is None:
        raise ConversationError(
            f'data.template = "{CHAT_TEMPLATE}" but the processor and its tokenizer have no chat template'
        )
    messages = [_message(processor, turn.role, turn.text) for turn in turns]
    whole = renderer(messages, False)
    pieces: list[Piece] = []
    done = 0
    for index, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        before = renderer(messages[:index], True)
        through = renderer(messages[: index + 1], False)
        if not (whole.startswith(through) and through.startswith(before) and len(before) >= done):
            raise ConversationError(
                "the chat template does not render a conversation's beginning as its prefix"
            )
        pieces += [
            Piece(whole[done : len(before)], False),
            Piece(whole[len(before) : len(through)], True),
        ]
        done = len(through)
    pieces.append(Piece(whole[done:], False))
    return [piece for piece in pieces if piece.text]


def encode(
    processor,
    prompts: list[str],
    images: list,
    model,
    padding: bool = True,
    videos: list | None = None,
) -> dict:
    """Processor outputs for ``prompts``, their ``images`` (one list per prompt, or one image per
    prompt) and ``videos`` (frame arrays, in prompt order), on the model's device, with the pixel
    values in the model's dtype. The model's method prepares the images first (``downsample``
    resizes them), and a method that shortens the prompt (``pool``, ``visionzip``) gets each
    image's placeholders cut to its count."""
    method = getattr(model, "token_method", None)
    nested = bool(images) and all(isinstance(item, list | tuple) for item in images)
    if nested:  # per prompt: OneVision lays out an image alone and one of several differently
        images = [list(item) for item in images if item]
    if method is not None and images:
        images = (
            [method.prepare_images(item) for item in images]
            if nested
            else method.prepare_images(list(images))
        )
    inputs = processor(
        text=prompts,
        images=images or None,
        videos=videos or None,
        padding=padding,
        return_tensors="pt",
    ).to(model.device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs and inputs[key].is_floating_point():
            inputs[key] = inputs[key].to(model.dtype)
    if method is None:
        return inputs
    per_image = method.image_placeholders(model, inputs) or method.prompt_tokens_per_image()
    if per_image is not None:
        tokenizer = processor.tokenizer
        inputs = cut_image_placeholders(
            inputs,
            model.config.image_token_id,
            per_image,
            tokenizer.pad_token_id,
            tokenizer.padding_side,
        )
    return inputs


def _media_tokens(processor) -> dict[str, str]:
    """What a prompt holds for an image / a video: the family's placeholder (Qwen-VL wraps the
    pad token in its vision markers), else the processor's token."""
    family = family_for_processor(processor)
    if family is not None:
        return {kind: family.media_placeholder(processor, kind) for kind in ("image", "video")}
    return {
        "image": getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER,
        "video": getattr(processor, "video_token", None) or VIDEO_PLACEHOLDER,
    }


def _chat_renderer(processor):
    """``render(messages, add_generation_prompt) -> text`` through the processor's chat template,
    else the tokenizer's; None if neither has one."""
    if getattr(processor, "chat_template", None):
        return lambda messages, generation: processor.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=False
        )
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(tokenizer, "chat_template", None):
        return lambda messages, generation: tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=False
        )
    return None


def _message(processor, role: str, text: str) -> dict:
    """One chat message: llava-hf processor templates render content items (and drop a plain
    string), so there the text's image and video tokens become items where they stand; a
    tokenizer's template takes the text as it is."""
    if getattr(processor, "chat_template", None):
        tokens = _media_tokens(processor)
        # training data places LLaVA's <image> / <video>; a family may write them otherwise (Qwen-VL)
        text = text.replace(IMAGE_PLACEHOLDER, tokens["image"]).replace(
            VIDEO_PLACEHOLDER, tokens["video"]
        )
        return {"role": role, "content": content_items(text, tokens["image"], tokens["video"])}
    return {"role": role, "content": text}
