"""Uploads in the page: training images (count, size, readable image), copied into a dataset folder; adapter files
for the Library tab (size).

The folder is `$STUDIO_LIBRARY/.datasets/<adapter name>` (hidden, so the library ignores it). It outlives the run,
because resuming a stopped run needs the same `--images` folder. Same-named `.txt` files are captions, as in
`studio train --images DIR`.

Size limits: Gradio refuses any upload over `MAX_UPLOAD_BYTES` (the largest limit below) before it reaches the disk;
each tab then holds its own files to their limit, with a message that says what to do.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from studio.atomic import disk_full, is_disk_full
from studio.errors import StudioError
from studio.paths import library_dir
from trainers.data import CAPTION_SUFFIX, IMAGE_SUFFIXES, open_image


MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per training image
MAX_IMAGES = 200  # per dataset
MAX_ADAPTER_BYTES = 2 * 1024**3  # per imported adapter file (an SDXL LoRA of rank 128 is about 0.9 GB)
MAX_UPLOAD_BYTES = max(MAX_IMAGE_BYTES, MAX_ADAPTER_BYTES)  # Gradio's limit for any one upload


def dataset_dir(name: str) -> Path:
    """Where the uploaded images of adapter `name` are kept."""
    return library_dir() / ".datasets" / name


def check_uploads(files: Sequence[str | Path] | None) -> list[Path]:
    """The uploaded files as paths, or a StudioError that names the first bad file and what to do."""
    paths = [Path(f) for f in files or []]
    images = [p for p in paths if p.suffix.lower() != CAPTION_SUFFIX]
    if not images:
        raise StudioError(
            "no training images: upload 3 to 5 images of the concept, or pick a Shapes World emblem or texture"
        )
    if len(images) > MAX_IMAGES:
        raise StudioError(f"{len(images)} images uploaded; a dataset holds at most {MAX_IMAGES}, so pick the best")
    names = [p.name for p in paths]
    for name in names:
        if names.count(name) > 1:
            raise StudioError(f"two uploads are named {name}; rename one of them")
    stems = {p.stem for p in images}
    for path in paths:
        if path.suffix.lower() == CAPTION_SUFFIX:
            if path.stem not in stems:
                raise StudioError(f"{path.name} is a caption of no uploaded image; upload {path.stem}.png with it")
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise StudioError(f"{path.name} is not an image; upload {', '.join(IMAGE_SUFFIXES)} files")
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise StudioError(
                f"{path.name} is {size / 2**20:.1f} MB; images over {MAX_IMAGE_BYTES // 2**20} MB are refused, "
                "so resize it (training uses the model's resolution anyway)"
            )
        try:
            open_image(path)
        except StudioError:
            raise StudioError(
                f"{path.name} is damaged or not an image; upload {', '.join(IMAGE_SUFFIXES)} files"
            ) from None
    return paths


def check_adapter_upload(path: str | Path | None) -> Path:
    """An uploaded adapter file for the Library tab's import, or a StudioError saying what to do."""
    if not path:
        raise StudioError("choose a .safetensors adapter file to import")
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise StudioError(
            f"{path.name} is {size / 2**30:.1f} GB; adapter files over {MAX_ADAPTER_BYTES / 2**30:.0f} GB are refused "
            "in the page, so import it on the server with `studio library import FILE`"
        )
    return path


def save_dataset(paths: Sequence[Path], folder: Path) -> Path:
    """Replace `folder`'s contents with the checked uploads `paths`."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    try:
        for path in paths:
            shutil.copyfile(path, folder / path.name)
    except OSError as err:
        if not is_disk_full(err):
            raise
        shutil.rmtree(folder, ignore_errors=True)  # no half dataset for a later resume to train on
        raise disk_full(folder, "the uploaded images were not saved", "upload them again") from None
    return folder
