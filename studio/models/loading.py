"""Resolve a model name to a diffusers pipeline: `studio-tiny`, a diffusers folder, one original-layout
`.safetensors` file, or a hub id (local cache when offline).

Weights load from safetensors only; pickle formats are refused with an error that says how to convert.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from studio.errors import StudioError
from studio.paths import ASSETS


DEFAULT_MODEL = "studio-tiny"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.txt", "*.safetensors"]
_SD_CLASSES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}


def embedded_model_dir() -> Path:
    """`studio-tiny` inside the installed project (never relative to the working directory)."""
    return ASSETS / DEFAULT_MODEL


def _pickle_error(path: Path) -> StudioError:
    return StudioError(
        f"{path} is a pickle file ({path.suffix}); the studio loads safetensors only, because pickles can run code. "
        "Convert it once in a trusted environment, e.g. `python -c \"import torch, safetensors.torch as s; "
        f"s.save_file(torch.load('{path.name}', weights_only=True).get('state_dict'), '{path.stem}.safetensors')\"`, "
        "or download the .safetensors release of the model"
    )


def check_safetensors(path: Path) -> None:
    """Read the header of a safetensors file (cheap); a damaged or truncated file raises StudioError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except Exception as err:  # SafetensorError derives from Exception only
        raise StudioError(
            f"{path} is damaged or incomplete ({str(err).splitlines()[0]}); re-download or re-export it"
        ) from err


def _check_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise StudioError(
            f"{folder} is not a diffusers model folder (no model_index.json); pass a diffusers folder, "
            "an original-layout .safetensors checkpoint, or a hub id"
        )
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as err:
        raise StudioError(f"{index} is damaged ({err}); re-download or re-export the model") from err
    weight_files = [p for p in folder.rglob("*") if p.is_file() and p.parent != folder]
    safetensors_files = [p for p in weight_files if p.suffix == ".safetensors"]
    for path in safetensors_files:
        check_safetensors(path)
    if safetensors_files:
        return class_name
    pickles = [p for p in weight_files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_error(pickles[0])
    raise StudioError(
        f"{folder} has no .safetensors weights; re-export it with save_pretrained(safe_serialization=True)"
    )


def _from_folder(folder: Path, dtype: torch.dtype, **hub_kwargs: object) -> DiffusionPipeline:
    class_name = _check_folder(folder) if folder.is_dir() else "?"
    extra: dict[str, object] = {}
    if class_name == "StableDiffusionPipeline":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        return DiffusionPipeline.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, **extra, **hub_kwargs
        )
    except StudioError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudioError(f"could not load the model in {folder}: {first}; check that the folder is complete") from err


def _from_hub(model_id: str, dtype: torch.dtype) -> DiffusionPipeline:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(model_id, local_files_only=True, allow_patterns=_HUB_FILES)
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        if offline:
            raise StudioError(
                f"model {model_id!r} is not in the local Hugging Face cache and the hub is offline "
                "(HF_HUB_OFFLINE=1); "
                "download it once with network access, or pass a local folder or .safetensors file"
            ) from err
        try:
            folder = snapshot_download(model_id, allow_patterns=_HUB_FILES)
        except Exception as err2:  # network and hub errors come in many types
            raise StudioError(
                f"model {model_id!r} is not cached and could not be downloaded ({type(err2).__name__}); "
                "check the id and the network, or pass a local folder"
            ) from err2
    return _from_folder(Path(folder), dtype)


def resolve_model(model: str | os.PathLike[str]) -> tuple[str, Path | str]:
    """Classify a model reference: ("folder"|"file"|"hub", where). Raises StudioError with the fix."""
    text = str(model)
    if text == DEFAULT_MODEL:
        folder = embedded_model_dir()
        if not (folder / "model_index.json").is_file():
            raise StudioError(
                f"the embedded base {DEFAULT_MODEL!r} is not built yet ({folder} has no model_index.json); "
                "pass --model with a diffusers folder, a .safetensors checkpoint or a hub id"
            )
        return "folder", folder
    path = Path(text).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(path)
    if path.exists():
        if path.is_dir():
            return "folder", path
        if path.suffix.lower() == ".safetensors":
            return "file", path
        raise StudioError(f"{path} is not a model: pass a diffusers folder or an original-layout .safetensors file")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return "hub", text
    if path.suffix or os.sep in text:
        raise StudioError(f"{path} does not exist; check the path")
    raise StudioError(
        f"unknown model {text!r}: use {DEFAULT_MODEL!r}, a diffusers folder, a .safetensors checkpoint or a hub id "
        "like 'owner/name'"
    )


def _quiet_loading() -> None:
    """Loading bars of diffusers and transformers are noise in the CLI; the studio shows its own progress."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """Load an SD1.x / SD2.x / SDXL pipeline (or the embedded base) for inference, in `dtype` on `device`."""
    kind, where = resolve_model(model)
    _quiet_loading()
    if kind == "folder":
        pipe = _from_folder(Path(where), dtype)
    elif kind == "file":
        from studio.models.single_file import load_single_file

        pipe = load_single_file(Path(where), dtype=dtype)
    else:
        pipe = _from_hub(str(where), dtype)
    if type(pipe).__name__ not in _SD_CLASSES:
        raise StudioError(
            f"{model} is a {type(pipe).__name__}; the studio supports Stable Diffusion 1.x/2.x and SDXL pipelines"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
