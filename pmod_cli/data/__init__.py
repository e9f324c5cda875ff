"""Data: the LLaVA JSON format, conversation templates, and the tiny default (base model + synthetic set).

from pmod_cli.data import build_tiny_base, save_tiny_checkpoint, get_template
"""

from .llava_data import (
    IGNORE_INDEX,
    Collator,
    EncodedSample,
    SampleEncoder,
    ScanResult,
    SkipSample,
    SupervisedDataset,
    load_records,
    scan_records,
)
from .synthetic import ensure_synthetic
from .templates import TEMPLATES, ConversationTemplate, get_template, register_template
from .tiny import (
    build_tiny_base,
    build_tokenizer,
    resolve_tiny_path,
    save_tiny_checkpoint,
    tiny_llava,
)

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "Collator",
    "ConversationTemplate",
    "EncodedSample",
    "SampleEncoder",
    "ScanResult",
    "SkipSample",
    "SupervisedDataset",
    "build_tiny_base",
    "build_tokenizer",
    "ensure_synthetic",
    "get_template",
    "load_records",
    "register_template",
    "resolve_tiny_path",
    "save_tiny_checkpoint",
    "scan_records",
    "tiny_llava",
]
