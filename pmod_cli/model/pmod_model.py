"""What a p-MoD model adds to an HF multimodal model class, whatever its family.

A family's p-MoD class is ``class PMoDXForConditionalGeneration(PMoDModelMixin,
XForConditionalGeneration)`` (see ``families/``). The mixin converts the decoder layers when the
model is built (so ``from_pretrained`` finds the routers it saved), zero-initialises routers, and
hands every forward call the routing inputs its MoD layers need: which tokens are vision tokens
(the family decides) and which are real. A model may run another token-reduction method than
its own routing (``config.pmod_method``, see ``methods.py``); ``install_method`` sets it up.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from transformers import initialization as init

from .config import PMoDConfig
from .layer import RoutingInputs, convert_layer
from .methods import (
    TokenMethod,
    current_prompt_length,
    method_from_dict,
    prompt_length,
)
from .router import Router

_GENERATION_INPUTS: ContextVar[dict | None] = ContextVar("pmod_generation_inputs", default=None)


class PMoDModelMixin:
    """In front of an HF model class; ``pmod_family`` is set when the family is registered."""

    pmod_family = None  # the ModelFamily this class belongs to

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        convert_decoder_layers(self, PMoDConfig.from_dict(config.pmod or {}))
        self.install_routing_hooks()
        install_method(self, self.token_method)

    @property
    def pmod_config(self) -> PMoDConfig:
        return PMoDConfig.from_dict(self.config.pmod or {})

    @property
    def token_method(self) -> TokenMethod:
        """The token-reduction method the layers run (``pmod``: the model's own routing)."""
        method = method_from_dict(getattr(self.config, "pmod_method", None))
        return method.for_family(self.pmod_family.name)

    def generate(self, *args, **kwargs):
        # the prompt's width, so that FastV ranks with the prompt's last token at every step of
        # uncached decoding too (each step re-runs the whole sequence)
        prompt = kwargs.get("input_ids", args[0] if args else None)
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        # inputs that generate consumes before the first forward call (it encodes the images
        # ahead) but that the family needs to tell images and frames apart (Qwen-VL: the grids)
        grouping = {
            key: kwargs[key]
            for key in self.pmod_family.grouping_inputs
            if kwargs.get(key) is not None
        }
        with prompt_length(prompt.shape[1] if prompt is not None else None):
            token = _GENERATION_INPUTS.set(grouping)
            try:
                return super().generate(*args, **kwargs)
            finally:
                _GENERATION_INPUTS.reset(token)

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.pmod_family.decoder_layers(self)

    @property
    def retention_ratios(self) -> list[float]:
        return [layer.pmod_ratio for layer in self.decoder_layers]

    def _init_weights(self, module):
        if isinstance(module, Router):  # a fresh router weighs every token 1
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)

    def install_routing_hooks(self) -> None:
        if not getattr(self, "_pmod_routing_hook", None):
            self._pmod_routing_hook = self.register_forward_pre_hook(
                _add_routing_inputs, with_kwargs=True
            )
            self._pmod_loss_hook = self.register_forward_hook(_add_routing_loss, with_kwargs=True)


def _add_routing_inputs(model, args, kwargs):
    """Forward pre-hook: tell the layers which tokens are vision tokens and which are real.

    A hook rather than a ``forward`` override keeps the HF signature that ``generate`` inspects.
    ``vision_mask`` (batch, seq) may be passed instead of ``input_ids`` (with ``inputs_embeds``),
    and then, for ``budget="image"``, ``vision_groups`` (batch, seq) too.
    """
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    attention_mask = kwargs.get("attention_mask")
    vision_mask = kwargs.pop("vision_mask", None)
    vision_groups = kwargs.pop("vision_groups", None)
    if vision_mask is None and input_ids is not None:
        vision_mask = model.pmod_family.vision_mask(input_ids, model.config)
        vision_mask = _without_generated_tokens(vision_mask, attention_mask, kwargs)
    if vision_mask is not None:
        seq = vision_mask.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2:
            token_valid = attention_mask[:, -seq:].bool()
        else:
            token_valid = torch.ones_like(vision_mask)
        if (
            vision_groups is None
            and input_ids is not None
            and _per_image_budget(model)
            and vision_mask.any()
        ):
            # which image / frame each vision token belongs to, from the images' own sizes
            vision_groups = model.pmod_family.vision_groups(
                input_ids, model.config, {**(_GENERATION_INPUTS.get() or {}), **kwargs}
            )
        _check_placeholders(model, vision_mask, kwargs)
        kwargs["pmod_routing"] = RoutingInputs(
            vision_mask=vision_mask,
            token_valid=token_valid,
            vision_groups=vision_groups,
            prompt_length=current_prompt_length(),
            labels=kwargs.get("labels"),
        )
    return args, kwargs


def _without_generated_tokens(vision_mask: torch.Tensor, attention_mask, kwargs) -> torch.Tensor:
    """Inside ``generate``: a generated token is text even when the model picked a vision token's
    id (a random or undertrained model may): it carries no vision features, and cached and
    uncached decoding must route it alike."""
    prompt = current_prompt_length()
    if prompt is None:
        return vision_mask
    seq = vision_mask.shape[1]
    # the chunk's first place in the whole sequence: after the cached tokens (a 2-D mask spans both)
    if attention_mask is not None and attention_mask.dim() == 2:
        start = attention_mask.shape[1] - seq
    else:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start = cache.get_seq_length() if cache is not None else 0
    generated = torch.arange(start, start + seq, device=vision_mask.device) >= prompt
    return vision_mask & ~generated[None, :]


def _per_image_budget(model) -> bool:
    return (model.config.pmod or {}).get("budget", "sample") == "image"


def _check_placeholders(model, vision_mask: torch.Tensor, inputs: dict) -> None:
    """A method that shortens the prompt takes its count of placeholders per image; say how to get them rather than let the
    model fail on a count mismatch."""
    method = model.token_method
    per_image = method.prompt_tokens_per_image()
    if per_image is None or not vision_mask.any():
        return
    starts = vision_mask & ~torch.nn.functional.pad(vision_mask, (1, 0))[:, :-1]
    counts = method.image_placeholders(model, inputs)  # when they depend on the image
    expected = sum(counts) if counts is not None else int(starts.sum()) * per_image
    if int(vision_mask.sum()) != expected:
        raise ValueError(
            f"this model runs {method.label} with {per_image} vision tokens per image, but the input holds "
            f"{int(vision_mask.sum())} image placeholders for {int(starts.sum())} image(s); encode prompts with "
            "pmod_cli.data.prompts.encode (or methods.cut_image_placeholders) to get that count"
        )


def _add_routing_loss(model, args, kwargs, output):
    """Forward hook: add the layers' auxiliary routing losses (if any) to the language-model loss."""
    routing = kwargs.get("pmod_routing")
    if routing is not None and routing.aux_losses and getattr(output, "loss", None) is not None:
        output.loss = output.loss + torch.stack(routing.aux_losses).sum()
    return output


def convert_decoder_layers(model, config: PMoDConfig) -> None:
    """Give every decoder layer of ``model`` its ratio (and router) under ``config``, in place."""
    text_model = model.model.language_model
    layers = model.pmod_family.decoder_layers(model)
    ratios = config.retention_ratios(len(layers))
    shared_router = None
    if config.shared_router and any(r < 1.0 for r in ratios):
        shared_router = getattr(text_model, "pmod_shared_router", None)
        if shared_router is None:
            # the width from the config: under ZeRO-3's zero.Init a parameter's shape is (0,)
            reference = text_model.norm.weight
            hidden_size = model.config.text_config.hidden_size
            shared_router = Router(hidden_size, device=reference.device, dtype=reference.dtype)
            text_model.pmod_shared_router = shared_router
    elif getattr(text_model, "pmod_shared_router", None) is not None:
        del text_model.pmod_shared_router
    for layer, ratio in zip(layers, ratios, strict=True):
        convert_layer(layer, ratio, config, shared_router)


def install_method(model, method: TokenMethod) -> None:
    """Give every decoder layer what ``method`` asks of it, and the method's own hooks; the
    model's routers and ratios stay as they are (``method=pmod`` restores its own routing)."""
    family = model.pmod_family
    layers = family.decoder_layers(model)
    method.check_family(family)
    method = method.for_family(family.name)
    vision_tokens = (
        family.shape_from_config(model.config).vision_tokens if method.needs_vision_tokens else None
    )
    method.check(len(layers), vision_tokens)
    ranking = method.ranking_layers(len(layers))
    modes = method.layer_modes([layer.pmod_ratio for layer in layers])
    for index, (layer, mode) in enumerate(zip(layers, modes, strict=True)):
        layer.token_mode = mode
        layer.token_method = method
        layer.ranks_tokens = index in ranking
    for hook in getattr(model, "_pmod_method_hooks", ()):
        hook.remove()
    model._pmod_method_hooks = []
    method.install(model, vision_tokens)
