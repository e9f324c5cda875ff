"""The Jinja chat templates a checkpoint's processor carries, one per conversation template.

Each renders exactly the text its conversation template in ``data/templates.py`` trains on (the
pieces and their targets live there); a model whose checkpoint saved no chat template gets its
family's (``ModelFamily.template_name``). Torch-free.
"""

from __future__ import annotations

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHATML_SYSTEM = "You are a helpful assistant."

# content is a string (LLaVA style, "<image>" inline) or a list of {"type": "image"|"video"|"text"}
# items, rendered in their order, one line each: [image, text] is "<image>\nWhat is it?" as LLaVA
# writes it, and [text, image] is "What is it?\n<image>", the question before the image
_JINJA_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'video' %}<video>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
)

# content items as the released Qwen-VL chat templates write them (the vision markers around the
# pad token that the processor expands), each image / video on its own line as in LLaVA data
# ("<image>\n..."), so a prompt is the text the model trained on
_QWEN_VL_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>\n"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
)


def _chatml_jinja(content: str) -> str:
    """The ChatML chat template, each message's content rendered by the jinja ``content``."""
    return (
        "<|im_start|>system\n" + CHATML_SYSTEM + "<|im_end|>\n"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}<|im_start|>user\n" + content + "<|im_end|>\n"
        "{% elif message['role'] == 'assistant' %}<|im_start|>assistant\n"
        + content
        + "<|im_end|>\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHAT_TEMPLATES: dict[str, str] = {
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% if message['content'] is string %}"
        "{% for _ in range(message['content'].count('<image>')) %}<image>{% endfor %}"
        "{% for _ in range(message['content'].count('<video>')) %}<video>{% endfor %}"
        "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
        "{% elif item['type'] == 'video' %}<video>{% endif %}{% endfor %}"
        "{% endif %}"
        "{% elif message['role'] == 'assistant' %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
        "{% endif %}\n"
        "{% endif %}"
        "{% endfor %}"
    ),
    "vicuna_v1": (
        "{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: " + _JINJA_CONTENT + " ASSISTANT:"
        "{% elif message['role'] == 'assistant' %} " + _JINJA_CONTENT + "{{ eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "chatml": _chatml_jinja(_JINJA_CONTENT),
    "qwen_vl": _chatml_jinja(_QWEN_VL_CONTENT),
}
