"""One loader for every command: a checkpoint to model + processor.

``pmod eval``, ``visualize``, ``arank``, ``chat``, flops calibration, ``convert`` and training from
``model.checkpoint`` all load through ``load_checkpoint``. It reads HF-native directories of any
registered model family (dense, or p-MoD with its own ``model_type``) as they are, original
LLaVA and official p-MoD checkpoints through ``model.formats``, translated in memory (their vision
tower must then be a local directory: the config's ``mm_vision_tower`` or ``vision_tower=``), and
LoRA adapter directories (``model.adapters``), merged into their base checkpoint on load.
``convert_checkpoint`` writes any of them as an HF-native directory.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from ..errors import UserError
from ..runtime import resolve_device, tokenizer_problem
from .adapters import (
    FULL_WEIGHTS_FILE,
    is_adapter_directory,
    is_hub_id,
    read_adapter_info,
    resolve_base,
)
from .config import PMoDConfig
from .families import family_for_config, family_for_model_type, known_model_types
from .formats import detect_format, import_checkpoint, inspect_checkpoint, read_config
from .modeling import apply_pmod, mod_layer_indices
from .weights import check_weight_files, is_weight_read_error, read_file, weight_read_error


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside the
    block: a command's output is its table or answer, and an error stays one line."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def read_model_type(path: str | Path, vision_tower: str | Path | None = None) -> str:
    """The ``model_type`` the checkpoint loads as (a registered family's dense or p-MoD type); a
    UserError if the directory is unusable. A foreign checkpoint is checked as far as it can be
    without its weights (its settings and its vision tower)."""
    if is_adapter_directory(path):
        return read_adapter_info(path).model_type
    if detect_format(path) == "llava_hf":
        return read_config(path).get("model_type")
    return inspect_checkpoint(path, vision_tower).hf_model_type


def read_num_layers(path: str | Path, vision_tower: str | Path | None = None) -> int:
    """The number of decoder layers of a checkpoint in any format pmod reads (no weights loaded)."""
    if is_adapter_directory(path):
        return read_adapter_info(path).num_layers
    if detect_format(path) == "llava_hf":
        try:
            return AutoConfig.from_pretrained(str(path)).text_config.num_hidden_layers
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the config of {path}: {_first_line(err)}") from None
    return inspect_checkpoint(path, vision_tower).num_layers


def load_checkpoint(
    reference: str | Path,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    pmod: PMoDConfig | None = None,
    require_pmod: bool = False,
    vision_tower: str | Path | None = None,
    dense: bool = False,
    quantization_config=None,
):
    """Load ``(model, processor)`` from a checkpoint in any format pmod reads (or a Hub id), in eval mode.

    ``device=None`` picks CUDA when available. ``pmod`` converts a dense checkpoint on load (or
    re-plans a p-MoD one); ``require_pmod`` refuses a dense checkpoint (commands that show
    routing); ``dense`` loads an official p-MoD checkpoint without its routers (every layer dense).
    ``quantization_config`` (an HF-native checkpoint only: QLoRA training) loads it quantized,
    placed on the current CUDA device.
    """
    reference = str(reference)
    if is_hub_id(reference):
        model, processor = _load_hf_native(
            reference, dtype, attn_implementation, quantization_config
        )
    else:
        _check_pmod(reference, vision_tower, require_pmod and pmod is None and not dense)
        if is_adapter_directory(reference):
            model, processor = _load_adapter(
                Path(reference), dtype, attn_implementation, vision_tower
            )
        elif detect_format(reference) == "llava_hf":
            model, processor = _load_hf_native(
                reference, dtype, attn_implementation, quantization_config
            )
        else:
            model, processor = _load_foreign(
                Path(reference), dtype, attn_implementation, vision_tower, dense
            )
    if pmod is not None:
        apply_pmod(model, pmod)
    if quantization_config is None:  # a quantized model is placed as it loads and cannot move
        model = model.to(resolve_device(device) if device is None else device)
    return model.eval(), processor


def _check_pmod(reference: str, vision_tower, required: bool) -> None:
    model_type = read_model_type(reference, vision_tower)
    if model_type not in known_model_types():
        raise UserError(
            f"{reference} holds a {model_type!r} model; pmod works with {', '.join(known_model_types())} checkpoints"
        )
    if required and model_type not in known_model_types(pmod=True):
        family = family_for_model_type(model_type)
        raise UserError(
            f"{reference} holds a dense {family.title} model ({model_type!r}), not a p-MoD one "
            f"({family.pmod_model_type!r}); convert it with `pmod convert` or train it with `pmod sft`"
        )


def _load_hf_native(reference: str, dtype, attn_implementation, quantization_config=None):
    kwargs = {
        key: value
        for key, value in (("dtype", dtype), ("attn_implementation", attn_implementation))
        if value
    }
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=_current_cuda_device())
    try:
        processor = AutoProcessor.from_pretrained(reference)
    except (OSError, ValueError) as err:
        if problem := tokenizer_problem(reference):
            raise UserError(f"cannot load the tokenizer of {reference}: {problem}") from None
        raise UserError(
            f"cannot load the processor of {reference} ({_first_line(err)}); save it next to the model "
            "with processor.save_pretrained"
        ) from None
    if not is_hub_id(reference):
        check_weight_files(
            reference
        )  # a file cut short is named here, not deep inside from_pretrained
    try:
        with quiet_progress_bars():
            model = AutoModelForImageTextToText.from_pretrained(reference, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load the checkpoint in {reference}: {_first_line(err)}") from None
    except Exception as err:
        if is_weight_read_error(err):  # damage the header checks cannot see
            raise weight_read_error(reference, err) from None
        raise
    return model, processor


def _current_cuda_device() -> dict[str, int]:
    """``device_map`` putting the whole model on this process's GPU (LOCAL_RANK under a launcher)."""
    return {"": torch.cuda.current_device()}


def _load_adapter(path: Path, dtype, attn_implementation, vision_tower):
    """A LoRA adapter directory: its base loaded (any format), converted as it was trained, the
    parts trained in full loaded, and PEFT's adapter merged in (``model.adapters``)."""
    from peft import PeftModel

    info = read_adapter_info(path)
    base = resolve_base(path, info)
    model, _ = load_checkpoint(
        base,
        device="cpu",
        dtype=dtype,
        attn_implementation=attn_implementation,
        vision_tower=vision_tower,
    )
    if info.pmod is not None:
        apply_pmod(model, PMoDConfig.from_dict(info.pmod))
    _load_full_weights(model, read_file(path / FULL_WEIGHTS_FILE), path)
    try:
        with quiet_progress_bars(), warnings.catch_warnings():
            # PEFT asks for transformers' deprecated gradient-checkpointing flag
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (ValueError, RuntimeError) as err:  # adapter and base do not fit
        raise UserError(
            f"cannot put the LoRA adapter {path} on its base {base}: {_first_line(err)}"
        ) from None
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the processor of {path} ({_first_line(err)})") from None
    return model, processor


def _load_full_weights(model, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The parts an adapter run trained in full, by parameter name and shape."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in parameters:
                raise UserError(f"{path}: the adapter's base has no parameter {name}")
            if parameters[name].shape != tensor.shape:
                raise UserError(
                    f"{path}: {name} is {tuple(tensor.shape)}, the base's {tuple(parameters[name].shape)}"
                )
            parameters[name].copy_(tensor.to(parameters[name].dtype))


def _load_foreign(path: Path, dtype, attn_implementation, vision_tower, dense: bool):
    """An original LLaVA / official p-MoD checkpoint as an HF-native dense (or p-MoD) model."""
    imported = import_checkpoint(
        path, vision_tower, dtype if isinstance(dtype, torch.dtype) else None
    )
    model_class = family_for_config(imported.config).dense_model_class
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    _check_weights_fit(model_class, imported.config, imported.state_dict, path)
    with quiet_progress_bars():
        model = model_class.from_pretrained(
            None,
            config=imported.config,
            state_dict=imported.state_dict,
            dtype=next(iter(imported.state_dict.values())).dtype,
            **kwargs,
        )
    if imported.pmod is not None and not dense:
        apply_pmod(model, imported.pmod)
        _copy_routers(model, imported.routers)
    return model, imported.processor


def _check_weights_fit(
    model_class, config, state_dict: dict[str, torch.Tensor], path: Path
) -> None:
    """Every weight the model needs, of the shape it needs (checked on a meta-device shell)."""
    with torch.device("meta"):
        expected = {name: tensor.shape for name, tensor in model_class(config).state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in state_dict:
            raise UserError(f"{path}: its weights lack what llava-hf calls {name}")
        if state_dict[name].shape != shape:
            raise UserError(
                f"{path}: {name} is {tuple(state_dict[name].shape)}, but its config makes it {tuple(shape)}"
            )


def _copy_routers(model, routers: dict[int, dict[str, torch.Tensor]]) -> None:
    """The checkpoint's routers into the layers that are MoD (a re-planned layer without one stays fresh)."""
    layers = model.decoder_layers
    with torch.no_grad():
        for index in mod_layer_indices(model):
            if index in routers:
                router = layers[index].router
                router.weight.copy_(routers[index]["weight"].reshape(router.weight.shape))
                router.bias.copy_(routers[index]["bias"].reshape(router.bias.shape))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    config: PMoDConfig | None = None,
    *,
    overrides: dict | None = None,
    dense: bool = False,
    vision_tower: str | Path | None = None,
) -> Path:
    """Write ``source`` (any format pmod reads, a LoRA adapter merged) to ``destination`` as an
    HF-native checkpoint.

    A p-MoD checkpoint by default: ``config`` (fresh routers) for a dense source, an official
    p-MoD checkpoint's own settings and routers otherwise; ``overrides`` change single options of
    either (``{"beta": 0.4}``). ``dense`` writes a plain llava-hf checkpoint instead. Everything
    is read and checked before anything is written; the directory appears whole or not at all.
    """
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UserError(f"{destination} exists and is not empty; choose a new output directory")
    fmt = "lora_adapter" if is_adapter_directory(source) else detect_format(source)
    if dense and (fmt in ("llava_hf", "lora_adapter") or config is not None or overrides):
        raise UserError(
            "--dense writes original LLaVA and official p-MoD checkpoints as plain llava-hf ones, without "
            "p-MoD options; drop --dense or the schedule options"
        )
    model, processor = load_checkpoint(source, vision_tower=vision_tower, dense=dense)
    if not dense:
        base = config or getattr(model, "pmod_config", None) or PMoDConfig()
        apply_pmod(model, base.replace(**(overrides or {})) if overrides else base)
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with quiet_progress_bars():
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if destination.exists():
        destination.rmdir()
    staging.rename(destination)  # the directory appears whole or not at all
    return destination


def pmod_overrides(**options) -> dict:
    """The p-MoD options a user gave (those not None), checked: a bad value is a UserError."""
    overrides = {name: value for name, value in options.items() if value is not None}
    try:
        PMoDConfig().replace(**overrides)
    except ValueError as err:
        raise UserError(str(err)) from None
    return overrides


def checkpoint_summary(checkpoint: str | Path) -> str:
    """One line about a written HF-native checkpoint: how many of its layers are MoD."""
    config = read_config(checkpoint)
    num_layers = config["text_config"]["num_hidden_layers"]
    if "pmod" not in config:
        return f"a dense {config['model_type']} checkpoint, {num_layers} layers"
    ratios = PMoDConfig.from_dict(config["pmod"]).retention_ratios(num_layers)
    return f"{sum(r < 1 for r in ratios)} of {len(ratios)} layers are MoD"
