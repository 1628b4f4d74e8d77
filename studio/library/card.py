"""The model card (README.md) of a library entry: Hugging Face style front matter plus a short human page."""

from __future__ import annotations

from studio.library.meta import AdapterMeta


def render_card(
    name: str, meta: AdapterMeta, *, sample_prompts: list[str] | None = None, data_summary: str = ""
) -> str:
    """A model card: trigger words, sample prompts, data summary, base and method."""
    trigger = ", ".join(meta.trigger_words)
    kind = {"LORA": "lora", "LOKR": "lokr"}.get(meta.peft_type, "sparse-delta")
    tags = ["text-to-image", "diffusers", kind, "lora-studio", *meta.tags]
    lines = ["---", f"base_model: {meta.base.name or meta.base.family}", "tags:"]
    lines += [f"- {t}" for t in dict.fromkeys(tags)]
    if trigger:
        lines.append(f"instance_prompt: {trigger}")
    lines += ["---", "", f"# {name}", ""]
    if meta.description:
        lines += [meta.description, ""]
    lines += [
        f"- Trigger words: {trigger or '(none)'}",
        f"- Kind: {meta.kind}",
        f"- Method: {meta.method} ({meta.peft_type})",
        f"- Base: {meta.base.family}{f' ({meta.base.name})' if meta.base.name else ''}",
        "",
    ]
    if sample_prompts:
        lines += ["## Sample prompts", "", *[f"- `{p}`" for p in sample_prompts], ""]
    if data_summary:
        lines += ["## Data", "", data_summary, ""]
    lines += [f"Use it with `studio.load_adapters(pipe, [name])` or `<lora:{name}:1>` in a prompt.", ""]
    return "\n".join(lines)
