"""The web UI (`python app.py`): a Gradio view over the Python API, one file per tab plus the pieces they share.

`launch(build_app(), host="127.0.0.1", port=7860)` serves it as `python app.py` does.
"""

from __future__ import annotations

from studio.ui.app import build_app
from studio.ui.launch import launch, main, parse_args


__all__ = ["build_app", "launch", "main", "parse_args"]
