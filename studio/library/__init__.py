"""The adapter library: folders on disk (`Library`), formats in and out, adapter tools, loading into pipelines.

from studio.library import Library, load_adapters, unload_adapters
lib = Library()                                  # $STUDIO_LIBRARY, default ./library
import_adapter("my_lora.safetensors", name="my-lora")
load_adapters(pipe, ["my-lora", "other"], [0.8, 0.5]); ...; unload_adapters(pipe)
"""

from __future__ import annotations

import importlib
from typing import Any


# Imports are lazy, as in `studio/__init__.py`: `studio library list` reads the index without importing torch or peft.
_EXPORTS = {
    "CheckpointMismatchWarning": "studio.library.compat",
    "base_info": "studio.library.compat",
    "checkpoint_hash": "studio.library.compat",
    "load_adapters": "studio.library.load",
    "loaded_adapters": "studio.library.load",
    "unload_adapters": "studio.library.load",
    "AdapterMeta": "studio.library.meta",
    "BaseInfo": "studio.library.meta",
    "Entry": "studio.library.store",
    "Library": "studio.library.store",
    "check_name": "studio.library.store",
    "slugify": "studio.library.store",
    "delta_weight": "studio.library.tools",
    "edit": "studio.library.tools",
    "export_adapter": "studio.library.tools",
    "import_adapter": "studio.library.tools",
    "merge": "studio.library.tools",
    "resize": "studio.library.tools",
    "retrieve": "studio.library.retrieval",
    "train_retriever": "studio.library.retrieval",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'studio.library' has no attribute {name!r}")


__all__ = [
    "AdapterMeta",
    "BaseInfo",
    "CheckpointMismatchWarning",
    "Entry",
    "Library",
    "base_info",
    "check_name",
    "checkpoint_hash",
    "delta_weight",
    "edit",
    "export_adapter",
    "import_adapter",
    "load_adapters",
    "loaded_adapters",
    "merge",
    "resize",
    "retrieve",
    "slugify",
    "train_retriever",
    "unload_adapters",
]
