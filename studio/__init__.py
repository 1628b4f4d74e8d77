"""LoRA Studio: train concept adapters for text-to-image diffusion models, keep them in a library, compose them.

The public Python API; the CLI (`studio ...`) and the web UI (`app.py`) are thin layers over these functions.
Imports are lazy so that `import studio` and `studio --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any


_EXPORTS = {
    "load_pipeline": "studio.models",
    "generate": "studio.generate",
    "GenerateConfig": "studio.generate",
    "encode_prompt": "studio.prompts",
    "StudioError": "studio.errors",
    "load_adapters": "studio.library",
    "unload_adapters": "studio.library",
    "Library": "studio.library",
    "retrieve": "studio.library.retrieval",
    "train_retriever": "studio.library.retrieval",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'studio' has no attribute {name!r}")
