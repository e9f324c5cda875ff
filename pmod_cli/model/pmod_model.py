"""What a p-MoD model adds to an HF multimodal model class, whatever its family.

A family's p-MoD class is ``class PMoDXForConditionalGeneration(PMoDModelMixin,
XForConditionalGeneration)`` (see ``families/``). The mixin converts the decoder layers when the
model is built (so ``from_pretrained`` finds the routers it saved), zero-initialises routers, and
hands every forward call the routing inputs its MoD layers need: which tokens are vision tokens
(the family decides) and which are real.
"""

from __future__ import annotations

import torch
from transformers import initialization as init

from .config import PMoDConfig
from .layer import RoutingInputs, convert_layer
from .router import Router


class PMoDModelMixin:
    """In front of an HF model class; ``pmod_family`` is set when the family is registered."""

    pmod_family = None  # the ModelFamily this class belongs to

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        convert_decoder_layers(self, PMoDConfig.from_dict(config.pmod or {}))
        self.install_routing_hooks()

    @property
    def pmod_config(self) -> PMoDConfig:
        return PMoDConfig.from_dict(self.config.pmod or {})

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
    ``vision_mask`` (batch, seq) may be passed instead of ``input_ids`` (with ``inputs_embeds``).
    """
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    attention_mask = kwargs.get("attention_mask")
    vision_mask = kwargs.pop("vision_mask", None)
    if vision_mask is None and input_ids is not None:
        vision_mask = model.pmod_family.vision_mask(input_ids, model.config)
    if vision_mask is not None:
        seq = vision_mask.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2:
            token_valid = attention_mask[:, -seq:].bool()
        else:
            token_valid = torch.ones_like(vision_mask)
        kwargs["pmod_routing"] = RoutingInputs(vision_mask=vision_mask, token_valid=token_valid)
    return args, kwargs


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
