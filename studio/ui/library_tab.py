"""The Library tab: `studio.library` in the page: previews and metadata, search, import, export, merge, edit, delete.

Each action calls the function `studio library ...` calls (`import_adapter`, `export_adapter`, `merge`, `edit`,
`Library.remove`); deleting asks for confirmation first. The listing filters by method, kind and base
(`Library.search`), sorts by any of them, and marks each adapter with whether it loads on a chosen base model
(`studio.library.compat.fit`, the check `load_adapters` makes). A chosen adapter's model card is shown as text.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from studio.cli.library import parse_sources
from studio.errors import StudioError
from studio.library import Library, edit, export_adapter, import_adapter, merge
from studio.library.compat import BaseSignature, base_signature, fit
from studio.library.formats import FORMATS
from studio.library.meta import KINDS
from studio.models import DEFAULT_MODEL
from studio.ui.display import LABELLED, PIXELATED, display_copy
from studio.ui.errors import shows_errors
from studio.ui.uploads import MAX_ADAPTER_BYTES, check_adapter_upload


COLUMNS = ["name", "fits base", "kind", "method", "type", "base", "trigger words", "tags", "ranks", "description"]
ALL = "all"  # a filter that keeps everything
SORTS = ("name", "method", "kind", "base")
RETRIEVE_COLUMNS = ["rank", "name", "score", "weights", "metadata", "learned"]
RETRIEVE_K = 5
FAMILIES = ("sd1", "sd2", "sdxl", "unknown")  # base families (`studio.library.compat.family_of`)
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\([^)]*\)")  # card images point into the entry folder, not the page
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)  # the card's YAML header (shown as metadata instead)


def _split(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _row(s: dict[str, Any], badge: str) -> list[Any]:
    lists = (", ".join(map(str, s[key])) for key in ("trigger_words", "tags", "ranks"))
    return [s["name"], badge, s["kind"], s["method"], s["type"], s["base"], *lists, s["description"]]


@functools.lru_cache(maxsize=4)
def signature_of(model: str) -> BaseSignature:
    """The base `model`'s signature, read once per model from the page's shared pipeline cache."""
    from studio.generate import cached_pipeline

    return base_signature(cached_pipeline(model, "cpu"), name=model)


def _chosen(value: str | None) -> str | None:
    return None if value in (None, "", ALL) else value


def library_view(
    query: str = "",
    *,
    method: str | None = None,
    kind: str | None = None,
    base: str | None = None,
    sort: str = "name",
    fits_model: str | None = None,
) -> tuple[list[tuple[str, str]], list[list[Any]], list[str], str]:
    """(gallery of first previews, metadata rows, names, problems) of the entries matching `query` and the method,
    kind and base filters (None or "all": any), sorted by `sort` then name; with `fits_model`, each entry is marked
    with whether it loads on that base."""
    if sort not in SORTS:
        raise gr.Error(f"sort by one of {', '.join(SORTS)}, not {sort!r}")
    lib = Library()
    entries = lib.search(
        query.strip() if query and query.strip() else None,
        method=_chosen(method),
        kind=_chosen(kind),
        base=_chosen(base),
    )
    summaries = {e.name: e.summary() for e in entries}
    entries.sort(key=lambda e: (str(summaries[e.name][sort]), e.name))
    signature = signature_of(fits_model.strip()) if fits_model and fits_model.strip() else None
    badges = {e.name: _badge(e, signature) for e in entries}
    gallery = [
        (display_copy(e.samples[0]), f"{e.name} {badges[e.name]}".strip()) for e in entries if e.samples
    ]
    rows = [_row(summaries[e.name], badges[e.name]) for e in entries]
    problems = "\n".join(f"{name}: unreadable ({message})" for name, message in sorted(lib.problems.items()))
    return gallery, rows, [e.name for e in entries], problems


def retrieve_view(prompt: str, weights_only: bool = False, k: int = RETRIEVE_K) -> list[list[Any]]:
    """Rows (rank, name, score, weights score, metadata score, learned) of the adapters AutoLoRA retrieval finds for
    `prompt` (`studio retrieve`, `studio.library.retrieval.retrieve`); learned: "no, train the retriever" for an
    adapter added after the retriever was trained, whose weights it reads poorly."""
    from studio.library.retrieval import retrieve

    found = retrieve(prompt or "", k, weights_only=weights_only)
    learned = {None: "", True: "yes", False: "no, train the retriever"}
    return [[i, r.name, r.score, "" if r.weights is None else r.weights, "" if r.metadata is None else r.metadata,
             learned[r.learned]] for i, r in enumerate(found, 1)]


def train_retriever_view(steps: int | None = None) -> str:
    """Train the library's AutoLoRA retriever (`studio retrieve --train`); what was trained, in a line. Its tqdm bar
    is what the page's progress shows."""
    from studio.library.retrieval import RetrieverConfig, train_retriever

    config = RetrieverConfig() if steps is None else RetrieverConfig(steps=steps)
    info = train_retriever(Library(), config)
    return (f"retriever trained on {len(info['trained_on'])} adapters in {info['seconds']} s (final loss "
            f"{info['final_loss']:.3f}); search with weights only now reads the adapters' weights")


def _badge(entry: Any, signature: BaseSignature | None) -> str:
    if signature is None:
        return ""
    try:
        return fit(entry, signature).badge
    except StudioError:  # damaged weights: the entry is listed, the check cannot be made
        return "? unreadable"


def filter_choices() -> dict[str, list[str]]:
    """The methods present in the library, the kinds and the base families (each with "all" first)."""
    entries = Library().list()
    families = dict.fromkeys([*FAMILIES, *sorted({e.meta.base.family for e in entries})])
    methods = sorted({e.meta.method for e in entries})
    return {"method": [ALL, *methods], "kind": [ALL, *KINDS], "base": [ALL, *families]}


def card_text(card: str) -> str:
    """The model card as shown: without its YAML header (shown as metadata instead) and image links (the previews
    and the loss curve are shown beside it)."""
    return _IMAGE_LINK.sub("", _FRONT_MATTER.sub("", card)).strip()


def entry_view(name: str | None) -> tuple[str, list[str], str | None, dict[str, Any], str, str, str, str]:
    """(card, previews, loss curve, summary, trigger words, tags, kind, description) of one entry."""
    if not name:
        return "", [], None, {}, "", "", "subject", ""
    entry = Library().get(name)
    previews = [display_copy(p) for p in entry.samples]
    loss = entry.folder / "loss.png"
    meta = entry.meta
    return (
        card_text(entry.card),
        previews,
        str(loss) if loss.is_file() else None,
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
    with gr.Tab("Library", id="library", elem_id="tab-library") as tab:
        with gr.Row():
            query = gr.Textbox(
                label="search (names, cards, trigger words, tags)", scale=4, min_width=200, elem_id="lib-search"
            )
            refresh = gr.Button("Refresh", scale=1, min_width=100, elem_id="lib-refresh")
        with gr.Row():
            described = gr.Textbox(label="find by description (AutoLoRA retrieval: reads the adapters' weights once "
                                   "the retriever is trained on this library; until then the cards)", scale=4,
                                   min_width=200, elem_id="lib-retrieve")
            weights_only = gr.Checkbox(False, label="weights only", scale=1, elem_id="lib-retrieve-weights-only")
            find = gr.Button("Find", scale=1, min_width=100, elem_id="lib-retrieve-button")
            retrain = gr.Button("Train the retriever", scale=1, min_width=100, elem_id="lib-retrieve-train")
        found = gr.Dataframe(headers=RETRIEVE_COLUMNS, label="retrieved (best first)", interactive=False,
                             elem_id="lib-retrieved")
        with gr.Row():
            choices = filter_choices()
            method_filter, kind_filter, base_filter = (
                gr.Dropdown(choices[key], value=ALL, label=key, min_width=120, elem_id=f"lib-filter-{key}")
                for key in ("method", "kind", "base")
            )
            sort = gr.Dropdown(list(SORTS), value="name", label="sort by", min_width=120, elem_id="lib-sort")
            fits_model = gr.Textbox(
                DEFAULT_MODEL, label="fits base? (a model; empty: no check)", min_width=160, elem_id="lib-fits-model"
            )
        gallery = gr.Gallery(
            label="adapters (first preview; ✓ fits the base above, ✗ does not)",
            columns=8,
            height=220,
            fit_columns=False,
            allow_preview=False,  # a click chooses the adapter
            format="png",
            elem_id="lib-gallery",
            elem_classes=[PIXELATED, LABELLED],
        )
        table = gr.Dataframe(headers=COLUMNS, label="metadata", interactive=False, elem_id="lib-table")
        problems = gr.Textbox(label="entries that could not be read", visible=False)
        selected = gr.Dropdown([], label="adapter", elem_id="lib-selected", allow_custom_value=True)
        message = gr.Textbox(label="result", elem_id="lib-message")
        with gr.Row():
            with gr.Column():
                card = gr.Markdown(elem_id="lib-card")
                previews = gr.Gallery(label="previews", columns=4, height=200, format="png", elem_id="lib-previews",
                                      elem_classes=[PIXELATED])  # fmt: skip
                # labelled: before an adapter is chosen the frame is empty, and says what it will show
                loss = gr.Image(label="loss curve", type="filepath", format="png", elem_id="lib-loss")
                with gr.Accordion("metadata (JSON)", open=False):
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

    filters = [method_filter, kind_filter, base_filter]
    listing = [gallery, table, selected, problems, *filters]
    details = [card, previews, loss, summary, triggers, tags, kind, description]
    view_inputs = [query, *filters, sort, fits_model]

    def view(text: str, method: str, kind_value: str, base: str, order: str, model: str) -> tuple[Any, ...]:
        """The listing's outputs (gallery, rows, names, problems, filter choices) for the current filters."""
        try:
            items, rows, names, trouble = library_view(
                text, method=method, kind=kind_value, base=base, sort=order, fits_model=model
            )
        except StudioError as err:  # the base to check against does not load: list without the check
            gr.Warning(f"cannot check which adapters fit {model!r}: {err}")
            items, rows, names, trouble = library_view(text, method=method, kind=kind_value, base=base, sort=order)
        present = filter_choices()
        updates = [gr.update(choices=present[key]) for key in ("method", "kind", "base")]
        return items, rows, names, gr.update(value=trouble, visible=bool(trouble)), *updates

    @shows_errors
    def on_refresh(current: str | None, *values: str) -> tuple[Any, ...]:
        items, rows, names, trouble, *updates = view(*values)
        chosen = current if current in names else None
        return items, rows, gr.update(choices=names, value=chosen), trouble, *updates

    for event in (tab.select, refresh.click, query.submit, *(c.input for c in (*filters, sort)), fits_model.submit):
        event(on_refresh, inputs=[selected, *view_inputs], outputs=listing, api_name=False)

    def on_pick(evt: gr.SelectData) -> str:
        caption = evt.value["caption"] if isinstance(evt.value, dict) else str(evt.value)
        return caption.split()[0]  # "name ✓ fits": names are slugs, without spaces

    gallery.select(on_pick, outputs=selected)

    @shows_errors
    def on_find(prompt: str, only_weights: bool) -> tuple[list[list[Any]], Any]:
        rows = retrieve_view(prompt, only_weights)
        return rows, gr.update(value=rows[0][1] if rows else None)  # the best match's card opens below

    for event in (find.click, described.submit):
        event(on_find, inputs=[described, weights_only], outputs=[found, selected], api_name=False)

    @shows_errors
    def on_train_retriever(progress: gr.Progress = gr.Progress(track_tqdm=True)) -> str:  # noqa: B008
        return train_retriever_view()

    retrain.click(on_train_retriever, outputs=message, api_name=False)
    selected.change(shows_errors(entry_view), inputs=selected, outputs=details)

    def after(action: Any) -> Any:
        """Run `action`, then refresh the listing; its message goes to the result box."""

        @shows_errors
        def handler(*args: Any) -> tuple[Any, ...]:
            text, name = action(*args[: -len(view_inputs)])
            items, rows, names, trouble, *updates = view(*args[-len(view_inputs) :])
            chosen = name if name in names else None
            return text, items, rows, gr.update(choices=names, value=chosen), trouble, *updates

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

    edits = [selected, triggers, tags, kind, description, rename]
    save.click(on_save, inputs=[*edits, *view_inputs], outputs=[message, *listing])

    @after
    def on_import(path: str | None, name: str) -> tuple[str, str]:
        entry = import_adapter(check_adapter_upload(path), name=name.strip() or None)
        return f"imported {entry.name}", entry.name

    import_button.click(on_import, inputs=[upload, import_name, *view_inputs], outputs=[message, *listing])

    @after
    def on_merge(text: str, name: str, how: str, rank: float | None) -> tuple[str, str]:
        entry = merge(parse_sources(text), name.strip(), combination=how, rank=int(rank) if rank else None)
        return f"merged into {entry.name}", entry.name

    merge_button.click(
        on_merge, inputs=[sources, merged_name, combination, merge_rank, *view_inputs], outputs=[message, *listing]
    )

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

    confirm.click(on_confirm, inputs=[selected, *view_inputs], outputs=[message, *listing]).then(
        lambda: gr.update(visible=False), outputs=confirm_row
    )
    return tab
