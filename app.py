"""LoRA Studio web UI: a Gradio view over the Python API (`studio.generate`, `trainers.train`, `studio.library`).

    python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass]

Binds to 127.0.0.1 unless told otherwise. Every action calls the same public functions as the CLI; the tabs live
in `studio/ui/`.
"""

from __future__ import annotations

from studio.openmp import choose_ui_policy


choose_ui_policy()  # OpenMP spins briefly, or sleeps where other processes run: jobs run side by side (studio.openmp)

from studio.ui import build_app, launch, main, parse_args  # noqa: E402 (after the OpenMP setting, before torch)


__all__ = ["build_app", "launch", "main", "parse_args"]


if __name__ == "__main__":
    main()
