"""`Library`: the adapter folders under `$STUDIO_LIBRARY` (default `./library`) and their derived index.

The folders are the truth; `index.jsonl` is a cache (one JSON line per good entry, with file stamps) rebuilt on
demand and never edited by hand. Writers (`add`, `remove`, `replace_meta`, `rename`) stage a whole folder, rename
it into place and update the index under an exclusive file lock, so concurrent processes never lose an entry.
A writer killed at any point leaves the library readable: a half-staged folder is hidden (`.staging-*`), an index
that missed the last write is rebuilt from the folders' stamps, and an overwrite killed between its two renames (the
old folder moved aside as `.trash-NAME-*`, the new one not yet in place) gets the old folder back on the next
`list()`. `reindex` also deletes the hidden leftovers of killed writers.

Trainers write entries with:

    from studio.library import AdapterMeta, BaseInfo, Library
    meta = AdapterMeta(method="dreambooth_lora", kind="subject", trigger_words=["sks"], alphas=..., ranks=...,
                       base=BaseInfo(family="sd1", fingerprint=..., checkpoint=...))
    Library().add("corgi-lora-sd1", state_dict, meta, card=None, samples={"seed0000.png": png}, train_config={...})

`state_dict` uses canonical keys (`unet.<module>.lora_A.weight`, ...; see `studio.library.meta`).
`studio.library.compat.base_info(pipe, modules)` fills `BaseInfo` from a pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio import atomic
from studio.errors import DiskFull, StudioError
from studio.library.adapter import (
    CARD_NAME,
    CONFIG_NAME,
    STUDIO_NAME,
    WEIGHTS_NAME,
    copy_extras,
    read_adapter,
    read_meta,
    save_adapter,
)
from studio.library.card import render_card
from studio.library.meta import AdapterMeta, from_studio_dict, to_studio_dict
from studio.paths import library_dir


if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
INDEX_NAME = "index.jsonl"
LOCK_NAME = ".lock"


def check_name(name: str) -> str:
    """Names are slugs: lowercase letters, digits, `-` and `_`, at most 64, so they are safe folder names."""
    if not isinstance(name, str) or not SLUG.match(name):
        raise StudioError(
            f"adapter name {name!r} is not a slug; use lowercase letters, digits, '-' and '_' (e.g. corgi-lora-sd1)"
        )
    return name


def slugify(text: str) -> str:
    """A best-effort slug from a file name or title."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:64]
    return slug or "adapter"


@dataclass
class Entry:
    """One good library entry. Tensors load lazily with `state_dict()`."""

    name: str
    folder: Path
    meta: AdapterMeta
    modules: list[str] = field(default_factory=list)

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors, _ = read_adapter(self.folder)
        return tensors

    @property
    def card(self) -> str:
        path = self.folder / CARD_NAME
        return path.read_text(errors="replace") if path.is_file() else ""

    @property
    def samples(self) -> list[Path]:
        return sorted((self.folder / "samples").glob("*.png"))

    def summary(self) -> dict[str, Any]:
        """The JSON view used by `studio library list --json`."""
        ranks = sorted(set(self.meta.ranks.values()))
        return {
            "name": self.name,
            "kind": self.meta.kind,
            "method": self.meta.method,
            "type": self.meta.peft_type.lower(),
            "base": self.meta.base.family,
            "trigger_words": self.meta.trigger_words,
            "tags": self.meta.tags,
            "description": self.meta.description,
            "ranks": ranks,
            "modules": len(self.modules),
            "components": sorted({m.split(".", 1)[0] for m in self.modules}),
            "path": str(self.folder),
        }


def _stamp(folder: Path) -> list[int]:
    out = []
    for name in (CONFIG_NAME, STUDIO_NAME, WEIGHTS_NAME, CARD_NAME):
        try:
            st = (folder / name).stat()
            out += [st.st_mtime_ns, st.st_size]
        except FileNotFoundError:
            out += [0, 0]
    return out


class Library:
    """The adapter library over a folder: list, get, add, remove, search, and metadata edits."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else library_dir()
        self.problems: dict[str, str] = {}  # name -> message, for entries that could not be read at the last list()

    # --- reading -----------------------------------------------------------------------------------------------
    def folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def __contains__(self, name: str) -> bool:
        return (self.root / name / CONFIG_NAME).is_file() or (self.root / name / WEIGHTS_NAME).is_file()

    def get(self, name: str) -> Entry:
        """The entry `name`, or a StudioError naming a missing entry or the damaged file."""
        check_name(name)
        folder = self.root / name
        if not folder.is_dir():
            known = ", ".join(p.name for p in self.folders()[:10]) or "none"
            raise StudioError(f"no adapter named {name!r} in {self.root} (known: {known}); see `studio library list`")
        meta, modules = read_meta(folder)
        return Entry(name, folder, meta, modules)

    def _read_index(self) -> dict[str, dict[str, Any]]:
        try:
            lines = (self.root / INDEX_NAME).read_text().splitlines()
        except FileNotFoundError:
            return {}
        out = {}
        for line in lines:
            try:
                row = json.loads(line)
                out[row["name"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                return {}  # a damaged cache is rebuilt
        return out

    def _row(self, entry: Entry) -> dict[str, Any]:
        return {
            "name": entry.name,
            "stamp": _stamp(entry.folder),
            "modules": entry.modules,
            "studio": to_studio_dict(entry.meta),
            "peft_type": entry.meta.peft_type,
            "ranks": entry.meta.ranks,
            "alphas": entry.meta.alphas,
            "card": entry.card[:4000],
        }

    def _entry_from_row(self, row: dict[str, Any]) -> Entry:
        studio = dict(row["studio"])
        meta = AdapterMeta(
            peft_type=row["peft_type"],
            ranks=row["ranks"],
            alphas=row["alphas"],
            **{k: v for k, v in studio.items() if k in AdapterMeta.__dataclass_fields__},
        )
        return Entry(row["name"], self.root / row["name"], meta, row["modules"])

    def _write_index(self, rows: dict[str, dict[str, Any]]) -> None:
        text = "".join(json.dumps(rows[n], sort_keys=True) + "\n" for n in sorted(rows))
        try:
            atomic.write_text(self.root / INDEX_NAME, text)
        except DiskFull as err:  # a cache: the old index stays, its stale stamps make the next list() re-read
            log.warning("library index not updated: %s", err)

    def _recover(self) -> None:
        """Put back the old folder of an overwrite killed between its renames (`.trash-NAME-*` with no NAME)."""
        if not any(p.name.startswith(".trash-") for p in self.root.iterdir()):
            return
        with atomic.locked(self.root / LOCK_NAME):  # a live writer finishes its renames first
            for trash in sorted(self.root.glob(".trash-*")):
                name = trash.name[len(".trash-") :].rsplit("-", 1)[0]
                if SLUG.match(name) and not (self.root / name).exists():
                    os.rename(trash, self.root / name)
                    log.warning("restored %s: a write was killed while replacing it", name)

    def list(self) -> list[Entry]:
        """Every readable entry, sorted by name. Unreadable ones are left out and described in `self.problems`."""
        self.problems = {}
        if self.root.is_dir():
            self._recover()
        index = self._read_index()
        rows, entries, changed = {}, [], False
        for folder in self.folders():
            row = index.get(folder.name)
            if row is not None and row.get("stamp") == _stamp(folder):
                try:
                    entries.append(self._entry_from_row(row))
                    rows[folder.name] = row
                    continue
                except (KeyError, TypeError, StudioError):
                    pass
            changed = True
            try:
                if not SLUG.match(folder.name):
                    raise StudioError(f"folder {folder} is not a slug name; rename it (lowercase, digits, - and _)")
                meta, modules = read_meta(folder)
                entry = Entry(folder.name, folder, meta, modules)
            except StudioError as err:
                self.problems[folder.name] = str(err)
                continue
            entries.append(entry)
            rows[folder.name] = self._row(entry)
        if changed or set(rows) != set(index):
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic.locked(self.root / LOCK_NAME):
                self._write_index(rows)
        return entries

    def reindex(self, stale_after: float = 3600.0) -> dict[str, str]:
        """Rebuild `index.jsonl` from the folders, and delete what killed writers left: removed and replaced folders,
        and staging folders untouched for `stale_after` seconds (a live writer's are younger); returns the problems."""
        if self.root.is_dir():
            self._recover()
            now = time.time()
            for leftover in self.root.glob(".*-*"):
                stale = leftover.name.startswith(".staging-") and now - leftover.stat().st_mtime >= stale_after
                if leftover.is_dir() and (leftover.name.startswith((".trash-", ".removed-")) or stale):
                    shutil.rmtree(leftover, ignore_errors=True)
        (self.root / INDEX_NAME).unlink(missing_ok=True)
        self.list()
        return dict(self.problems)

    def search(
        self,
        text: str | None = None,
        *,
        name: str | None = None,
        tag: str | None = None,
        kind: str | None = None,
        base: str | None = None,
        method: str | None = None,
    ) -> list[Entry]:
        """Entries matching every given filter: name substring, tag, kind, base family or name, training method, free
        text (card, fields)."""
        index = self._read_index()
        out = []
        for entry in self.list():
            m = entry.meta
            if name and name.lower() not in entry.name:
                continue
            if tag and tag.lower() not in [t.lower() for t in m.tags]:
                continue
            if kind and m.kind != kind:
                continue
            if method and m.method != method:
                continue
            if base and base.lower() not in (m.base.family.lower(), m.base.name.lower()):
                continue
            if text:
                card = index.get(entry.name, {}).get("card") or entry.card
                haystack = " ".join([entry.name, card, m.description, m.method, *m.tags, *m.trigger_words]).lower()
                if not all(word in haystack for word in text.lower().split()):
                    continue
            out.append(entry)
        return out

    # --- writing -----------------------------------------------------------------------------------------------
    def _stage(self, name: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f".staging-{name}-{uuid.uuid4().hex[:8]}"

    def _commit(self, stage: Path, name: str, overwrite: bool) -> Entry:
        target = self.root / name
        with atomic.locked(self.root / LOCK_NAME):
            if target.exists():
                if not overwrite:
                    shutil.rmtree(stage, ignore_errors=True)
                    raise StudioError(f"an adapter named {name!r} already exists; pick another --name or remove it")
                trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
                os.rename(target, trash)
                os.rename(stage, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(stage, target)
            meta, modules = read_meta(target)
            entry = Entry(name, target, meta, modules)
            rows = self._read_index()
            rows[name] = self._row(entry)
            self._write_index(rows)
        return entry

    def add(
        self,
        name: str,
        state_dict: dict[str, torch.Tensor],
        meta: AdapterMeta,
        *,
        card: str | None = None,
        samples: dict[str, bytes] | None = None,
        train_config: dict[str, Any] | None = None,
        overwrite: bool = False,
        extras_from: Path | None = None,
    ) -> Entry:
        """Write a new entry atomically (staged folder + rename). `card=None` renders a default model card."""
        check_name(name)
        stage = self._stage(name)
        try:
            if extras_from is not None:
                stage.mkdir(parents=True)
                copy_extras(Path(extras_from), stage)
            if card is None and not (stage / CARD_NAME).is_file():
                card = render_card(name, meta)
            save_adapter(stage, state_dict, meta, card=card, samples=samples, train_config=train_config)
        except BaseException as err:
            shutil.rmtree(stage, ignore_errors=True)
            if isinstance(err, DiskFull) or atomic.is_disk_full(err):  # staged files only: the library is unchanged
                kept = "the library keeps the previous one" if name in self else "the library is unchanged"
                raise atomic.disk_full(stage, f"adapter {name!r} was not written, {kept}") from None
            raise
        return self._commit(stage, name, overwrite)

    def replace_meta(self, name: str, meta: AdapterMeta, *, new_name: str | None = None) -> Entry:
        """Rewrite an entry's metadata (and optionally its name), keeping tensors, card extras and samples."""
        entry = self.get(name)
        target = check_name(new_name or name)
        if target != name and target in self:
            raise StudioError(f"an adapter named {target!r} already exists; pick another name")
        tensors = entry.state_dict()
        new = self.add(target, tensors, meta, extras_from=entry.folder, overwrite=target == name)
        if target != name:
            self.remove(name)
        return new

    def remove(self, name: str) -> None:
        check_name(name)
        target = self.root / name
        if not target.is_dir():
            raise StudioError(f"no adapter named {name!r} in {self.root}; see `studio library list`")
        with atomic.locked(self.root / LOCK_NAME):
            trash = self.root / f".removed-{name}-{uuid.uuid4().hex[:8]}"  # never restored, unlike `.trash-`
            os.rename(target, trash)
            rows = self._read_index()
            rows.pop(name, None)
            self._write_index(rows)
        shutil.rmtree(trash, ignore_errors=True)


__all__ = ["Entry", "Library", "check_name", "slugify", "from_studio_dict"]
