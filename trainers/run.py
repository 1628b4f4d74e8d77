"""`trainers.train(method, config)`: data, base model, the loop, then the adapter into the library.

A run lives in a folder (`config.run_dir`, default `$STUDIO_LIBRARY/.runs/<name>`; hidden, so the library ignores
it) holding `config.json`, `checkpoint.pt`, `losses.json`, `loss.png` and `samples/step-NNNNNN.png`. A finished run
adds the library entry `<name>` with fixed-seed sample previews, the loss curve, a model card and the full
`train_config.json` (method, method config, TrainConfig, seed).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio import atomic
from studio.errors import StudioError
from trainers.checkpoint import remove_stale_temporaries
from trainers.config import RESUMABLE_CHANGES, TrainConfig
from trainers.loop import Callbacks, Cancel, train_loop
from trainers.method import Method, MethodConfig
from trainers.streams import process_state


@dataclass
class TrainResult:
    status: str  # "done" (the adapter is in the library) | "cancelled" (resume with resume="latest")
    name: str
    step: int
    losses: list[float]
    run_dir: Path
    entry: Any = None  # studio.library.Entry when done (the first, when the method writes several)
    entries: list[Any] = dataclasses.field(default_factory=list)  # every library entry the run wrote
    method: Method | None = None  # the trained method, still attached to `pipe`
    pipe: Any = None
    sample_prompts: list[str] = dataclasses.field(default_factory=list)  # the previews' prompts (seed + i for i)


def resolve_method(method: str | MethodConfig, config: TrainConfig) -> MethodConfig:
    """The method config: a METHODS key (paper defaults) or a config, with `config.rank` / `config.lr` applied."""
    from trainers import METHODS

    if isinstance(method, str):
        if method not in METHODS:
            raise StudioError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        method = METHODS[method].config_cls()
    changes: dict[str, Any] = {}
    if config.rank is not None:
        if not any(f.name == "rank" for f in dataclasses.fields(method)):
            raise StudioError(f"--rank does not apply to {method.method}; see `studio train --help` for its options")
        changes["rank"] = config.rank
    if config.lr is not None:
        changes["lr"] = config.lr
    if any(f.name == "trigger" for f in dataclasses.fields(method)) and getattr(method, "trigger") is None:
        changes["trigger"] = config.trigger  # a method that trains the trigger's own embedding (orthogonal's rows)
    return dataclasses.replace(method, **changes) if changes else method


def _record(method: MethodConfig, config: TrainConfig) -> dict[str, Any]:
    return {"method": method.method, "method_config": dataclasses.asdict(method), **dataclasses.asdict(config)}


def _prepare_run_dir(method: MethodConfig, config: TrainConfig, main: bool = True) -> tuple[Path, bool]:
    """(run folder, resume?) after checking that a resumed run was started with the same settings. Every process
    checks; only the `main` one writes (under `accelerate launch` another process's clean-up would delete the
    main one's temporary file mid-write)."""
    resume = config.resume
    run_dir = config.default_run_dir() if resume in (None, "latest") else Path(resume)
    if run_dir.is_dir() and main:
        remove_stale_temporaries(run_dir)  # a run killed inside a write, even its first checkpoint's
    saved_path, has_checkpoint = run_dir / "config.json", (run_dir / "checkpoint.pt").is_file()
    if resume is None:
        if has_checkpoint and not config.overwrite:
            raise StudioError(
                f"{run_dir} already holds a run of {config.name!r}; continue it with --resume latest, "
                "start over with --overwrite, or pick another --name"
            )
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoint.pt").unlink(missing_ok=True)
            atomic.write_json(saved_path, _record(method, config))
        return run_dir, False
    if not has_checkpoint or not saved_path.is_file():
        raise StudioError(f"{run_dir} holds no run to resume; start it without --resume")
    saved, now = json.loads(saved_path.read_text()), _record(method, config)
    saved["method_config"].pop("lr", None)
    now["method_config"].pop("lr", None)
    for key in now:
        if key not in RESUMABLE_CHANGES and saved.get(key) != now[key]:
            raise StudioError(
                f"{run_dir} was started with {key}={saved.get(key)!r}, not {now[key]!r}; resume with "
                "the run's own settings (only steps, lr, save/sample cadence and --cuda-graphs may change)"
            )
    return run_dir, True


def train(
    method: str | MethodConfig | Method,
    config: TrainConfig,
    *,
    callbacks: Callbacks | None = None,
    cancel: Cancel = None,
    library: Any = None,
) -> TrainResult:
    """Train an adapter and add it to the library as `config.name`. `cancel` (an Event or a callable) stops at the
    next micro-step and leaves a checkpoint that `resume="latest"` continues."""
    from accelerate import PartialState

    from studio.library import Library
    from studio.library.card import render_card
    from studio.library.compat import base_info, checkpoint_hash
    from studio.library.meta import modules_of
    from studio.models import load_pipeline
    from trainers import METHODS
    from trainers.data import load_data

    method_config = resolve_method(method.config if isinstance(method, Method) else method, config)
    if isinstance(method, Method):  # a method not (yet) in METHODS
        method.config = method_config
    elif method_config.method not in METHODS:
        raise StudioError(f"method {method_config.method!r} is not in trainers.METHODS; pass a Method instance")
    else:
        method = METHODS[method_config.method](method_config)
    library = library if library is not None else Library()
    for entry_name in type(method).entry_names(method_config, config.name):
        if entry_name in library and not config.overwrite:
            raise StudioError(
                f"an adapter named {entry_name!r} already exists; pick another --name or pass --overwrite"
            )
    method.config = method_config = type(method).claim(method_config, library, config.name)
    state = process_state(config.device)  # the launch's processes, as the loop's Accelerator will see them
    run_dir, resume = _prepare_run_dir(method_config, config, state.is_main_process)
    state.wait_for_everyone()  # the run folder and its config.json exist for every process
    pipe = load_pipeline(config.model)
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = load_data(config, resolution, min_images=method_config.min_images, max_images=method_config.max_images,
                     prior=method_config.prior_preservation)
    checkpoint = checkpoint_hash(pipe)  # of the base as loaded (fp32), before any adapter or cast
    user_done = (callbacks or Callbacks()).on_done
    loop_callbacks = dataclasses.replace(callbacks or Callbacks(), on_done=None)
    looped = train_loop(method, pipe, data, config, run_dir, callbacks=loop_callbacks, cancel=cancel, resume=resume)
    result = TrainResult(looped.status, config.name, looped.step, looped.losses, run_dir, method=method, pipe=pipe,
                         sample_prompts=list(looped.sample_prompts))  # fmt: skip
    if looped.status == "done" and PartialState().is_main_process:  # one library write under `accelerate launch`
        samples = {f"seed{config.seed + i:04d}.png": _png(image) for i, image in enumerate(looped.samples)}
        for part in method.library_entries(config.name):
            meta = part.meta
            meta.kind = meta.kind if meta.kind != "unknown" else data.kind  # a method's split may set its own
            meta.trigger_words = [config.trigger]
            meta.description = f"{meta.kind} adapter trained with {method_config.method} on {data.summary}"
            meta.base = base_info(pipe, modules_of(part.tensors), name=config.model)
            meta.base.checkpoint = checkpoint
            card = render_card(part.name, meta, sample_prompts=looped.sample_prompts, data_summary=data.summary)
            card += part.card_notes
            card += f"\nTrained {looped.step} steps; final loss {looped.losses[-1]:.4f}.\n\n![loss curve](loss.png)\n"
            entry = library.add(
                part.name,
                part.tensors,
                meta,
                card=card,
                samples=samples,
                train_config=_record(method_config, config),
                overwrite=config.overwrite,
            )
            if (run_dir / "loss.png").is_file():
                atomic.write_bytes(entry.folder / "loss.png", (run_dir / "loss.png").read_bytes())
            result.entries.append(entry)
        result.entry = result.entries[0] if result.entries else None
    if user_done:
        user_done(result)
    return result


def _png(image: Any) -> bytes:
    from studio.library.adapter import png_bytes

    return png_bytes(image)
