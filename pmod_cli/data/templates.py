"""Conversation templates: how a LLaVA conversation becomes the text a model trains on.

A template turns the ``conversations`` of a sample into pieces of text, each marked as a target
(an assistant reply: the loss is computed on it) or not (system prompt, user turns, role
markers: labels -100). Each template also carries the equivalent Jinja chat template, which is
saved with the processor so that ``processor.apply_chat_template`` at evaluation time builds
exactly the prompt the model was trained on (the Jinja texts live with the model, in
``model/chat_templates.py``, since a checkpoint's processor carries them). Adding a template is
one ``register_template`` call.

- ``plain``: LLaVA's pretrain format, the image then the caption (the user's text and any later
  turns are dropped; every image and video is kept, ahead of the caption).
- ``vicuna_v1``: Vicuna v1.1 / LLaVA-1.5 ("SYSTEM USER: ... ASSISTANT: ...</s>").
- ``chatml``: Qwen2 and other ChatML models ("<|im_start|>user\\n...<|im_end|>\\n").
- ``qwen_vl``: Qwen2.5-VL / Qwen3-VL: ChatML, an image as "<|vision_start|><|image_pad|><|vision_end|>"
  (a video with ``<|video_pad|>``), as their released chat templates render them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..model.chat_templates import CHAT_TEMPLATES, CHATML_SYSTEM, VICUNA_SYSTEM

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
# ``data.template`` naming no template of the registry but the checkpoint's own chat template (its
# processor's, else its tokenizer's): training renders conversations with it (data/prompts.py)
CHAT_TEMPLATE = "chat_template"
MEDIA_PLACEHOLDERS = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Piece:
    text: str
    is_target: bool


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str


class ConversationError(ValueError):
    """A conversation that the template cannot format (the sample is skipped)."""


@dataclass(frozen=True)
class ConversationTemplate:
    """A named format; ``format`` builds the pieces, ``generation_prompt`` the inference prompt."""

    name: str
    description: str
    # (turns, eos token text) -> pieces
    format_fn: Callable[[list[Turn], str], list[Piece]]
    # (question with <image> placeholders) -> prompt ending where the assistant starts
    prompt_fn: Callable[[str], str]
    jinja: str

    def format(self, turns: list[Turn], eos_token: str) -> list[Piece]:
        return self.format_fn(turns, eos_token)

    def generation_prompt(self, question: str) -> str:
        return self.prompt_fn(question)


TEMPLATES: dict[str, ConversationTemplate] = {}


def register_template(template: ConversationTemplate) -> ConversationTemplate:
    TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(
            f"unknown conversation template {name!r}; choose one of {', '.join(TEMPLATES)}"
        ) from None


def parse_turns(conversations: list[dict], require_reply: bool = True) -> list[Turn]:
    """LLaVA ``from``/``value`` records -> alternating user/assistant turns (system turns dropped).

    As LLaVA and FastChat do with their data, an assistant turn that opens the conversation (a
    greeting) is dropped, and so is a user turn left without a reply at its end. With
    ``require_reply=False`` (questions to answer, not training samples) that last user turn is
    kept: a question alone is a conversation.
    """
    turns = []
    for message in conversations:
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise ConversationError("each conversation entry needs 'from' and 'value'")
        role = ROLE_ALIASES.get(str(message["from"]).lower())
        if role is None:
            raise ConversationError(f"unknown speaker {message['from']!r} (expected human/gpt)")
        if role == "system":
            continue
        if not isinstance(message["value"], str):
            raise ConversationError("a conversation 'value' must be a string")
        turns.append(Turn(role, message["value"]))
    if turns and turns[0].role == "assistant":
        turns = turns[1:]
    if require_reply and turns and turns[-1].role == "user" and len(turns) % 2 == 1:
        turns = turns[:-1]
    if not turns:
        raise ConversationError(
            "no user turn followed by an assistant reply" if require_reply else "no user turn"
        )
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ConversationError(
                f"turn {index} is from the {turn.role}, expected the {expected}"
            )
    if require_reply and turns[-1].role != "assistant":
        raise ConversationError("the conversation ends without an assistant reply")
    return turns


# ---- plain (pretrain) -------------------------------------------------------------------


def media_placeholders(text: str) -> list[str]:
    """The ``<image>`` / ``<video>`` placeholders of ``text``, in order."""
    pattern = "|".join(re.escape(placeholder) for placeholder in MEDIA_PLACEHOLDERS)
    return re.findall(pattern, text)


def _plain_format(turns: list[Turn], eos_token: str) -> list[Piece]:
    # LLaVA pretrain: the images stand for the user's text; the first reply is the caption. Later
    # turns are dropped, but not their images and videos: every one of them leads
    media = [
        p for index, turn in enumerate(turns) if index != 1 for p in media_placeholders(turn.text)
    ]
    return [Piece("".join(media), False), Piece(turns[1].text + "\n", True)]


register_template(
    ConversationTemplate(
        name="plain",
        description="LLaVA pretrain: <image> then the caption, loss on the caption",
        format_fn=_plain_format,
        prompt_fn=lambda question: "".join(media_placeholders(question)) or IMAGE_PLACEHOLDER,
        jinja=CHAT_TEMPLATES["plain"],
    )
)


# ---- vicuna_v1 (LLaVA-1.5, LLaVA-NeXT Vicuna) ---------------------------------------------


def _vicuna_format(turns: list[Turn], eos_token: str) -> list[Piece]:
    pieces = []
    for index in range(0, len(turns), 2):
        lead = VICUNA_SYSTEM + " " if index == 0 else ""
        pieces.append(Piece(f"{lead}USER: {turns[index].text} ASSISTANT:", False))
        pieces.append(Piece(f" {turns[index + 1].text}{eos_token}", True))
    return pieces


register_template(
    ConversationTemplate(
        name="vicuna_v1",
        description="Vicuna v1.1 / LLaVA-1.5: 'SYSTEM USER: ... ASSISTANT: ...</s>', loss on the replies",
        format_fn=_vicuna_format,
        prompt_fn=lambda question: f"{VICUNA_SYSTEM} USER: {question} ASSISTANT:",
        jinja=CHAT_TEMPLATES["vicuna_v1"],
    )
)


# ---- chatml (Qwen2) -----------------------------------------------------------------------


def _chatml_format(turns: list[Turn], eos_token: str) -> list[Piece]:
    pieces = [Piece(f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n", False)]
    for index in range(0, len(turns), 2):
        pieces.append(
            Piece(
                f"<|im_start|>user\n{turns[index].text}<|im_end|>\n<|im_start|>assistant\n", False
            )
        )
        pieces.append(Piece(f"{turns[index + 1].text}<|im_end|>", True))
        pieces.append(Piece("\n", False))
    return pieces


def _chatml_prompt(question: str) -> str:
    return (
        f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


register_template(
    ConversationTemplate(
        name="chatml",
        description="ChatML (Qwen2): '<|im_start|>role\\n...<|im_end|>', loss on the replies and <|im_end|>",
        format_fn=_chatml_format,
        prompt_fn=_chatml_prompt,
        jinja=CHAT_TEMPLATES["chatml"],
    )
)


# ---- qwen_vl (Qwen2.5-VL, Qwen3-VL) --------------------------------------------------------

register_template(
    ConversationTemplate(
        name="qwen_vl",
        description="Qwen2.5-VL / Qwen3-VL: ChatML with <|vision_start|><|image_pad|><|vision_end|> images",
        format_fn=_chatml_format,
        prompt_fn=_chatml_prompt,
        jinja=CHAT_TEMPLATES["qwen_vl"],
    )
)
