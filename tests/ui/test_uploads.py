"""Uploaded training images: at most 200 per dataset and 20 MB each, readable images only, captions beside them."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from studio.errors import StudioError
from studio.ui.uploads import MAX_IMAGE_BYTES, MAX_IMAGES, check_uploads, dataset_dir, save_dataset


def _png(path: Path) -> Path:
    Image.new("RGB", (16, 16), "red").save(path)
    return path


def test_images_and_their_captions_are_kept(tmp_path: Path) -> None:
    image, caption = _png(tmp_path / "a.png"), tmp_path / "a.txt"
    caption.write_text("a red square")
    paths = check_uploads([str(image), str(caption)])
    folder = save_dataset(paths, dataset_dir("corgi"))
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt"]
    assert folder.parent.name == ".datasets"  # hidden: the library ignores it
    save_dataset(check_uploads([_png(tmp_path / "b.png")]), folder)  # a new upload replaces the old one
    assert [p.name for p in folder.iterdir()] == ["b.png"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("photo.png", b"not a picture", "photo.png is damaged or not an image"),
        ("notes.pdf", b"%PDF-1.4", "notes.pdf is not an image"),
    ],
)
def test_non_images_are_refused_by_name(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(StudioError, match=message):
        check_uploads([_png(tmp_path / "good.png"), bad])


def test_images_over_20_mb_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "huge.png"
    with big.open("wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: no 20 MB written
    with pytest.raises(StudioError, match="huge.png is 20.0 MB; images over 20 MB are refused"):
        check_uploads([big])


def test_more_than_200_images_are_refused(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i:03d}.png" for i in range(MAX_IMAGES + 1)]  # the count is checked before any file
    with pytest.raises(StudioError, match="201 images uploaded; a dataset holds at most 200"):
        check_uploads(paths)


def test_empty_uploads_orphan_captions_and_twins_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StudioError, match="no training images"):
        check_uploads(None)
    orphan = tmp_path / "b.txt"
    orphan.write_text("x")
    with pytest.raises(StudioError, match="b.txt is a caption of no uploaded image"):
        check_uploads([_png(tmp_path / "a.png"), orphan])
    (tmp_path / "other").mkdir()
    with pytest.raises(StudioError, match="two uploads are named a.png"):
        check_uploads([tmp_path / "a.png", _png(tmp_path / "other" / "a.png")])


def test_library_import_uploads_are_held_to_their_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from studio.ui import uploads

    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * 2048)
    monkeypatch.setattr(uploads, "MAX_ADAPTER_BYTES", 1024)
    with pytest.raises(StudioError, match=r"big.safetensors is 0.0 GB; adapter files over 0 GB are refused in the "
                                          r"page, so import it on the server with `studio library import FILE`"):
        uploads.check_adapter_upload(big)
    with pytest.raises(StudioError, match="choose a .safetensors adapter file"):
        uploads.check_adapter_upload(None)
    monkeypatch.setattr(uploads, "MAX_ADAPTER_BYTES", 4096)
    assert uploads.check_adapter_upload(str(big)) == big
