"""Where the studio finds its own files and the user's library."""

from __future__ import annotations

import os
from pathlib import Path


PROJECT_ROOT = Path(__file__).resolve().parents[1]
ASSETS = PROJECT_ROOT / "assets"
CONFIGS = Path(__file__).resolve().parent / "models" / "configs"


def library_dir() -> Path:
    """The adapter library folder: `$STUDIO_LIBRARY`, default `./library`."""
    return Path(os.environ.get("STUDIO_LIBRARY", "library")).expanduser()


def cache_dir() -> Path:
    """A per-user cache for derived files (tokenizer vocabularies, class images)."""
    root = os.environ.get("STUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lora-studio"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
