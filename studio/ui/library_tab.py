"""The Library tab: `studio.library` in the page: previews and metadata, search, import, export, merge, edit, delete.

Each action calls the function `studio library ...` calls (`import_adapter`, `export_adapter`, `merge`, `edit`,
`Library.remove`); deleting asks for confirmation first.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from studio.cli.library import parse_sources
from studio.library import Library, edit, export_adapter, import_adapter, merge
from studio.library.formats import FORMATS
from studio.library.meta import KINDS
from studio.ui.errors import shows_errors
from studio.ui.uploads import MAX_ADAPTER_BYTES, check_adapter_upload


COLUMNS = ["name", "kind", "method", "type", "base", "trigger words", "tags", "ranks", "description"]
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\([^)]*\)")  # card images point into the entry folder, not the page
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)  # the card's YAML header (shown as metadata instead)


def _split(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _row(s: dict[str, Any]) -> list[Any]:
    lists = (", ".join(map(str, s[key])) for key in ("trigger_words", "tags", "ranks"))
    return [s["name"], s["kind"], s["method"], s["type"], s["base"], *lists, s["description"]]


def library_view(query: str = "") -> tuple[list[tuple[str, str]], list[list[Any]], list[str], str]:
    """(gallery of first previews, metadata rows, names, problems) of the entries matching `query`."""
    lib = Library()
    entries = lib.search(query) if query and query.strip() else lib.list()
    gallery = [(str(e.samples[0]), e.name) for e in entries if e.samples]
    rows = [_row(e.summary()) for e in entries]
    problems = "\n".join(f"{name}: unreadable ({message})" for name, message in sorted(lib.problems.items()))
    return gallery, rows, [e.name for e in entries], problems


def entry_view(name: str | None) -> tuple[str, list[str], dict[str, Any], str, str, str, str]:
    """(card, previews, summary, trigger words, tags, kind, description) of one entry."""
    if not name:
        return "", [], {}, "", "", "subject", ""
    entry = Library().get(name)
    previews = [str(p) for p in entry.samples]
    if (entry.folder / "loss.png").is_file():
        previews.append(str(entry.folder / "loss.png"))
    meta = entry.meta
    card = _IMAGE_LINK.sub("", _FRONT_MATTER.sub("", entry.card))
    return (
        card,
        previews,
        entry.summary(),
        ", ".join(meta.trigger_words),
        ", ".join(meta.tags),
        meta.kind,
        meta.description,
    )


def export_entry(name: str | None, format: str, out_dir: Path | None = None) -> str:
    """Export `name` in `format`; a folder (PEFT) is zipped so the page can offer one download."""
    if not name:
        raise gr.Error("pick an adapter first")
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="studio-export-"))
    target = out_dir / name if format == "peft" else out_dir / f"{name}-{format}.safetensors"
    path = export_adapter(name, format, target)
    if path.is_dir():
        path = Path(shutil.make_archive(str(path), "zip", root_dir=path))
    return str(path)


def build_library_tab() -> gr.Tab:
    with gr.Tab("Library", elem_id="tab-library") as tab:
        with gr.Row():
            query = gr.Textbox(label="search (names, cards, trigger words, tags)", scale=4, elem_id="lib-search")
            refresh = gr.Button("Refresh", scale=1, elem_id="lib-refresh")
        gallery = gr.Gallery(
            label="adapters (first preview)",
            columns=8,
            height=220,
            fit_columns=False,
            format="png",
            elem_id="lib-gallery",
        )
        table = gr.Dataframe(headers=COLUMNS, label="metadata", interactive=False, elem_id="lib-table")
        problems = gr.Textbox(label="entries that could not be read", visible=False)
        selected = gr.Dropdown([], label="adapter", elem_id="lib-selected", allow_custom_value=True)
        message = gr.Textbox(label="result", elem_id="lib-message")
        with gr.Row():
            with gr.Column():
                card = gr.Markdown()
                previews = gr.Gallery(label="previews and loss curve", columns=4, format="png")
                summary = gr.JSON(label="metadata")
            with gr.Column():
                with gr.Accordion("Edit", open=False):
                    triggers = gr.Textbox(label="trigger words (comma-separated)")
                    tags = gr.Textbox(label="tags (comma-separated)")
                    kind = gr.Dropdown(list(KINDS), label="kind")
                    description = gr.Textbox(label="description")
                    rename = gr.Textbox(label="new name (empty: keep)")
                    save = gr.Button("Save changes")
                with gr.Accordion("Export", open=False):
                    format = gr.Dropdown(list(FORMATS), value="kohya", label="format")
                    export = gr.Button("Export")
                    exported = gr.File(label="exported file")
                with gr.Accordion("Import", open=False):
                    upload = gr.File(label=f"a kohya / LyCORIS / diffusers .safetensors file (at most "
                                           f"{MAX_ADAPTER_BYTES // 2**30} GB)", elem_id="lib-import")
                    import_name = gr.Textbox(label="name (empty: from the file)")
                    import_button = gr.Button("Import")
                with gr.Accordion("Merge", open=False):
                    sources = gr.Textbox(label="adapters and weights", placeholder="corgi:0.7,watercolor:0.5")
                    merged_name = gr.Textbox(label="name of the merged adapter")
                    combination = gr.Dropdown(["cat", "linear", "svd"], value="cat", label="combination")
                    merge_rank = gr.Number(None, precision=0, label="rank (svd only)")
                    merge_button = gr.Button("Merge")
                delete = gr.Button("Delete…", variant="stop", elem_id="lib-delete")
                with gr.Row(visible=False) as confirm_row:
                    confirm_text = gr.Markdown()
                    confirm = gr.Button("Yes, delete it", variant="stop", elem_id="lib-delete-confirm")
                    keep = gr.Button("Keep it")

    listing = [gallery, table, selected, problems]
    details = [card, previews, summary, triggers, tags, kind, description]

    @shows_errors
    def on_refresh(text: str, current: str | None) -> tuple[Any, ...]:
        items, rows, names, trouble = library_view(text)
        chosen = current if current in names else None
        return items, rows, gr.update(choices=names, value=chosen), gr.update(value=trouble, visible=bool(trouble))

    for event in (tab.select, refresh.click, query.submit):
        event(on_refresh, inputs=[query, selected], outputs=listing, api_name=False)

    def on_pick(evt: gr.SelectData) -> str:
        return evt.value["caption"] if isinstance(evt.value, dict) else str(evt.value)

    gallery.select(on_pick, outputs=selected)
    selected.change(shows_errors(entry_view), inputs=selected, outputs=details)

    def after(action: Any) -> Any:
        """Run `action`, then refresh the listing; its message goes to the result box."""

        @shows_errors
        def handler(*args: Any) -> tuple[Any, ...]:
            text, name = action(*args)
            items, rows, names, trouble = library_view("")
            chosen = name if name in names else None
            return (
                text,
                items,
                rows,
                gr.update(choices=names, value=chosen),
                gr.update(value=trouble, visible=bool(trouble)),
            )

        return handler

    @after
    def on_save(name: str, trig: str, tag_text: str, kind_value: str, desc: str, new_name: str) -> tuple[str, str]:
        entry = edit(
            name,
            trigger_words=_split(trig),
            tags=_split(tag_text),
            kind=kind_value,
            description=desc,
            new_name=new_name.strip() or None,
        )
        return f"saved {entry.name}", entry.name

    save.click(on_save, inputs=[selected, triggers, tags, kind, description, rename], outputs=[message, *listing])

    @after
    def on_import(path: str | None, name: str) -> tuple[str, str]:
        entry = import_adapter(check_adapter_upload(path), name=name.strip() or None)
        return f"imported {entry.name}", entry.name

    import_button.click(on_import, inputs=[upload, import_name], outputs=[message, *listing])

    @after
    def on_merge(text: str, name: str, how: str, rank: float | None) -> tuple[str, str]:
        entry = merge(parse_sources(text), name.strip(), combination=how, rank=int(rank) if rank else None)
        return f"merged into {entry.name}", entry.name

    merge_button.click(on_merge, inputs=[sources, merged_name, combination, merge_rank], outputs=[message, *listing])

    export.click(shows_errors(export_entry), inputs=[selected, format], outputs=exported)

    def on_delete(name: str | None) -> tuple[Any, str]:
        if not name:
            raise gr.Error("pick an adapter first")
        return gr.update(visible=True), f"Delete **{name}** for good? Its weights, card and previews are removed."

    delete.click(on_delete, inputs=selected, outputs=[confirm_row, confirm_text])
    keep.click(lambda: gr.update(visible=False), outputs=confirm_row)

    @after
    def on_confirm(name: str) -> tuple[str, None]:
        Library().remove(name)
        return f"deleted {name}", None

    confirm.click(on_confirm, inputs=selected, outputs=[message, *listing]).then(
        lambda: gr.update(visible=False), outputs=confirm_row
    )
    return tab
