"""The adapter library: folders on disk (`Library`), formats in and out, adapter tools, loading into pipelines.

from studio.library import Library, load_adapters, unload_adapters
lib = Library()                                  # $STUDIO_LIBRARY, default ./library
import_adapter("my_lora.safetensors", name="my-lora")
load_adapters(pipe, ["my-lora", "other"], [0.8, 0.5]); ...; unload_adapters(pipe)
"""

from __future__ import annotations

from studio.library.compat import CheckpointMismatchWarning, base_info, checkpoint_hash
from studio.library.load import load_adapters, loaded_adapters, unload_adapters
from studio.library.meta import AdapterMeta, BaseInfo
from studio.library.store import Entry, Library, check_name, slugify
from studio.library.tools import delta_weight, edit, export_adapter, import_adapter, merge, resize


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
    "slugify",
    "unload_adapters",
]
