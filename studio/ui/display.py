"""How the page shows small images: enlarged by a whole factor with nearest-neighbour (crisp pixels), originals kept.

A 64x64 image drawn at 400 px by the browser is a blur; `display_image` enlarges it by an integer factor to at least
`DISPLAY_SIDE` pixels, each pixel a block, and the page's `.pixelated` galleries keep any further scaling crisp
(CSS `image-rendering: pixelated`). The files a user downloads (the PNGs with their parameters, the library's
samples) are always the originals; only the copies on screen are enlarged. In `.labelled` galleries each image's
caption (its seed, step, prompt) sits under it in full, instead of over its bottom edge cut to one line, and a
phone's width shows two images a row (pairs stay side by side) instead of cutting off the last column.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path

from PIL import Image

from studio.atomic import atomic_write


DISPLAY_SIDE = 256  # enlarge until the longer side is at least this
PIXELATED = "pixelated"  # elem_classes of galleries and images that show generated pixels
LABELLED = "labelled"  # elem_classes of galleries whose captions are shown in full under each image
CSS = f"""
.{PIXELATED} img {{ image-rendering: pixelated; }}
.{LABELLED} .thumbnail-item.thumbnail-lg {{ aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }}
.{LABELLED} .thumbnail-item.thumbnail-lg > img {{ aspect-ratio: 1 / 1; height: auto; min-height: 0; flex: none; }}
.{LABELLED} .grid-wrap.fixed-height {{ max-height: none; min-height: 0; }}
.{LABELLED} .thumbnail-item .caption-label {{
  position: static; max-width: none; white-space: normal; overflow: visible; text-overflow: clip;
  border: none; border-top: 1px solid var(--border-color-primary); border-radius: 0; opacity: 1;
}}
@media (max-width: 640px) {{
  .{LABELLED} .grid-container {{ grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }}
}}
"""
_VIEWS: Path | None = None


def scale_factor(size: tuple[int, int], side: int = DISPLAY_SIDE) -> int:
    """The whole factor that brings the longer side of `size` to at least `side` (1 for large images)."""
    return max(1, math.ceil(side / max(size)))


def display_image(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """`image` enlarged by `scale_factor` with nearest-neighbour: every pixel becomes a k x k block."""
    k = scale_factor(image.size, side)
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


def _views_dir() -> Path:
    global _VIEWS
    if _VIEWS is None or not _VIEWS.is_dir():
        _VIEWS = Path(tempfile.mkdtemp(prefix="studio-view-"))
    return _VIEWS


def display_copy(path: str | Path, side: int = DISPLAY_SIDE) -> str:
    """The path of an enlarged copy of the image file `path` (made once per file version, in a temp folder)."""
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}:{side}".encode()).hexdigest()[:20]
    out = _views_dir() / f"{path.stem}-{key}.png"
    if not out.is_file():
        with Image.open(path) as image:
            image.load()
            if scale_factor(image.size, side) == 1:
                return str(path)
            view = display_image(image.convert("RGBA" if "A" in image.getbands() else "RGB"), side)
        atomic_write(out, lambda tmp: view.save(tmp, format="png"))
    return str(out)


def display_item(image: Image.Image, caption: str, side: int = DISPLAY_SIDE) -> tuple[Image.Image, str]:
    """A gallery item (enlarged image, caption) of an in-memory image."""
    return display_image(image, side), caption
