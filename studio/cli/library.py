"""`studio library ...`: list, show, import, export, remove, reindex, merge, resize, edit (DESIGN.md section 8)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from studio.cli import COMMANDS
from studio.configs import finite
from studio.errors import StudioError


def _lib() -> Any:
    from studio.library import Library

    return Library()


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _warn_problems(lib: Any) -> None:
    for name, message in sorted(lib.problems.items()):
        print(f"warning: {name}: {message}", file=sys.stderr)


def cmd_list(args: argparse.Namespace) -> int:
    lib = _lib()
    entries = lib.search(args.query, tag=args.tag, kind=args.kind, base=args.base, name=args.name, method=args.method)
    if args.json:
        print(json.dumps([e.summary() for e in entries], indent=2))
    else:
        for e in entries:
            s = e.summary()
            trig = ", ".join(s["trigger_words"]) or "-"
            size = f"rank {s['ranks']}" if s["ranks"] else "sparse delta"  # a sparse delta (SaRA) has no rank
            print(f"{s['name']:32} {s['type']:5} {s['kind']:8} {s['base']:8} {size}  trigger: {trig}")
        if not entries:
            print(f"no adapters in {lib.root}" if not args.query else "no match")
    _warn_problems(lib)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    entry = _lib().get(args.name)
    if args.json:
        from studio.library.meta import to_studio_dict

        print(json.dumps({**entry.summary(), "studio": to_studio_dict(entry.meta)}, indent=2))
    else:
        for key, value in entry.summary().items():
            print(f"{key:14} {value}")
        if entry.card:
            print()
            print(entry.card)
    return 0


def _load_base(model: str | None) -> Any:
    if not model:
        return None
    try:
        from studio.models import load_pipeline
    except ImportError:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model, use_safetensors=True)
    return load_pipeline(model)


def cmd_import(args: argparse.Namespace) -> int:
    from studio.library import import_adapter

    entry = import_adapter(
        args.path,
        name=args.name,
        format=args.format,
        pipe=_load_base(args.model),
        kind=args.kind,
        trigger_words=_split(args.trigger),
        tags=_split(args.tags),
    )
    print(json.dumps(entry.summary()) if args.json else f"imported {entry.name} -> {entry.folder}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from studio.library import export_adapter

    print(export_adapter(args.name, args.format, Path(args.out)))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    _lib().remove(args.name)
    print(f"removed {args.name}")
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    lib = _lib()
    problems = lib.reindex()
    print(f"indexed {len(lib.list())} adapters in {lib.root}")
    _warn_problems(lib)
    return 1 if problems else 0


def parse_sources(text: str) -> list[tuple[str, float]]:
    out = []
    for part in text.split(","):
        name, _, weight = part.strip().partition(":")
        try:
            out.append((name, finite(weight, "the weight") if weight else 1.0))
        except StudioError as err:
            raise StudioError(f"bad weight in {part!r}: {err}; write NAME:WEIGHT, e.g. corgi:0.8") from None
    return out


def cmd_merge(args: argparse.Namespace) -> int:
    from studio.library import merge

    entry = merge(parse_sources(args.sources), args.name, combination=args.combination, rank=args.rank)
    print(json.dumps(entry.summary()) if args.json else f"merged into {entry.name}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from studio.library import resize

    errors = resize(args.name, args.rank, new_name=args.new_name)
    worst = max(errors.values()) if errors else 0.0
    if args.json:
        print(json.dumps({"name": args.new_name or args.name, "relative_error": errors}))
    else:
        print(f"resized {args.name} to rank {args.rank}; worst relative error {worst:.3g}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from studio.library import edit

    entry = edit(
        args.name,
        trigger_words=_split(args.trigger),
        tags=_split(args.tags),
        add_tags=_split(args.add_tag),
        remove_tags=_split(args.remove_tag),
        kind=args.kind,
        description=args.description,
        new_name=args.rename,
    )
    print(json.dumps(entry.summary()) if args.json else f"updated {entry.name}")
    return 0


def register(subparsers: Any) -> None:
    from studio.library.meta import EXPORT_FORMATS, FORMATS, KINDS  # light: `studio library list` starts without torch

    parser = subparsers.add_parser("library", help=COMMANDS[__name__])
    sub = parser.add_subparsers(dest="library_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    p = sub.add_parser("list", help="list adapters (filters combine)")
    p.add_argument("query", nargs="?", help="free text over names, cards, trigger words and tags")
    p.add_argument("--tag")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--base", help="base family (sd1, sd2, sdxl) or base name")
    p.add_argument("--method", help="training method (dreambooth_lora, sara, ...), imported or merge")
    p.add_argument("--name", help="name substring")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("search", help="same as list QUERY")
    p.add_argument("query")
    p.add_argument("--tag")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--base")
    p.add_argument("--method")
    p.add_argument("--name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="one adapter's fields and model card")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("import", help="import a kohya/LyCORIS/diffusers file or a PEFT/studio folder")
    p.add_argument("path")
    p.add_argument("--name", help="library name (a slug); default from the file")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS, "native"))
    p.add_argument("--model", help="base model to check against and record (a diffusers folder or model name)")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--trigger", help="comma-separated trigger words")
    p.add_argument("--tags", help="comma-separated tags")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write an adapter in another tool's format")
    p.add_argument("name")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="diff: one safetensors of full-weight differences (any adapter, sparse deltas included)")
    p.add_argument("--out", required=True, help="a .safetensors file or a folder (peft: a folder)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("remove", help="delete an adapter")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("reindex", help="rebuild index.jsonl from the folders")
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("merge", help="merge adapters: A:W,B:W --name N")
    p.add_argument("sources", help="NAME:WEIGHT[,NAME:WEIGHT...]")
    p.add_argument("--name", required=True)
    p.add_argument("--combination", default="cat", choices=("cat", "linear", "svd"))
    p.add_argument("--rank", type=int, help="target rank for --combination svd")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("resize", help="change an adapter's rank by SVD")
    p.add_argument("name")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--new-name", help="write a new entry instead of replacing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("edit", help="edit trigger words, tags, kind, description, name")
    p.add_argument("name")
    p.add_argument("--trigger", help="comma-separated trigger words (replaces)")
    p.add_argument("--tags", help="comma-separated tags (replaces)")
    p.add_argument("--add-tag")
    p.add_argument("--remove-tag")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--description")
    p.add_argument("--rename", help="new name (a slug)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_edit)
