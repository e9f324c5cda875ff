"""Data: the LLaVA JSON format (images and videos), conversation templates, video decoding, and the
tiny default (base models, the synthetic shapes set and its multi-image / video variant).

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
from .media import ensure_media
from .synthetic import ensure_synthetic
from .templates import (
    CHAT_TEMPLATE,
    TEMPLATES,
    ConversationTemplate,
    get_template,
    register_template,
)
from .tiny import build_tiny_base, resolve_tiny_path
from .tiny_build import build_tokenizer, save_tiny_checkpoint, tiny_llava
from .video import VideoError, read_frames, write_video

__all__ = [
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "TEMPLATES",
    "Collator",
    "ConversationTemplate",
    "EncodedSample",
    "SampleEncoder",
    "ScanResult",
    "SkipSample",
    "SupervisedDataset",
    "VideoError",
    "build_tiny_base",
    "build_tokenizer",
    "ensure_media",
    "ensure_synthetic",
    "get_template",
    "load_records",
    "read_frames",
    "register_template",
    "resolve_tiny_path",
    "save_tiny_checkpoint",
    "scan_records",
    "tiny_llava",
    "write_video",
]
