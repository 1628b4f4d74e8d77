"""B-LoRA on Shapes World: the rows of its bar (`studio bench adapters --method b_lora`) and the block-pair sweep.

Two one-image concepts, each a plain shape filled with a texture (`studio.world.datasets.textured_object`), trained
by `trainers.train` at the method's defaults from their single render (`--world-texture NAME`), each giving
`NAME-content` and `NAME-style`. For each concept X (the other one is Y), judged by the evaluator:

- style: X's style entry alone on 20 new scenes `... in {X trigger} style` (other shapes, colours, places): is X's
  texture found, are the asked shape, colour and position kept;
- content + texture word: X's content entry alone on `a large {X trigger} on the {place} on a {bg} background in
  {Y texture} style` (5 places x 4 backgrounds): X's shape and colour kept, Y's texture found, X's texture leaking;
- content + style entry: the same with Y's style entry loaded and Y's trigger for the style (the paper's style
  transfer);
- both: X's two entries on X's training prompt (20 seeds): X's object (shape and colour) in X's texture.

The sweep (`--sweep`) trains one concept per candidate block pair for a few steps and measures each block's entry
alone: T, the texture found on style prompts; P, the asked shape and colour kept there; O, the object's shape and
colour on content prompts (no style word); L, its texture there; and the same four for the base without adapters
(T0, P0, O0, L0). How much an entry moves is its figure minus the base's; the pair and roles with the largest
separation (T(style) - T0) + (O(content) - O0) - (L(content) - L0) - (P0 - P(style)) separate best: the style entry
moves texture and leaves shape and colour, the content entry moves the object and not its texture.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benches.judging import BATCH, PLACES, GenerateFn, Prompt, judge_texture, texture_prompts, training_peak


CONCEPTS = (("stripes", "vgl"), ("dots", "kbr"))  # (texture, trigger) of the two one-image concepts
STYLE_BAR = 0.80  # texture found with the style entry alone; and the asked shape, colour, position kept
SHAPE_BAR = 0.80  # content entry alone: the object's shape kept
NEW_TEXTURE_BAR = 0.70  # content entry alone: the asked other texture found
LEAK_BAR = 0.20  # content entry alone: its own texture found at most this often
BOTH_BAR = 0.80  # both entries: the training image's object and texture
SECONDS_BAR = 300.0
# Candidate (content, style) pairs of the embedded base's sweep: pairs inside each up block (the paper's W4/W5 are
# the two first transformer blocks of the lowest-resolution up block), across neighbouring resolutions, and the
# middle block against the highest-resolution decoder block, and the encoder's blocks (the default pair is the middle
# block against the highest-resolution encoder block: trainers/methods/b_lora.py).
CANDIDATES = (
    ("mid_block.attentions.0", "down_blocks.0.attentions.0"),
    ("mid_block.attentions.0", "up_blocks.2.attentions.1"),
    ("down_blocks.2.attentions.0", "down_blocks.0.attentions.0"),
    ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1"),
    ("up_blocks.1.attentions.0", "up_blocks.1.attentions.1"),
    ("up_blocks.2.attentions.0", "up_blocks.2.attentions.1"),
    ("up_blocks.0.attentions.1", "up_blocks.1.attentions.0"),
    ("up_blocks.1.attentions.0", "up_blocks.2.attentions.0"),
    ("up_blocks.1.attentions.1", "up_blocks.2.attentions.1"),
    ("mid_block.attentions.0", "up_blocks.2.attentions.0"),
    ("up_blocks.0.attentions.0", "up_blocks.2.attentions.0"),
)


def content_prompts(texture: str, trigger: str, style: str | None = None, n: int = 20) -> list[Prompt]:
    """The concept's object at each named place on each background (its own texture not asked), optionally
    `in {style} style`; the scene is the object's shape and colour there."""
    from studio.world.datasets import textured_object
    from studio.world.grammar import BACKGROUNDS, Scene

    obj = textured_object(texture)
    out = []
    for i, (pos, bg) in enumerate((p, b) for p in PLACES for b in BACKGROUNDS):
        text = f"a large {trigger} on the {pos} on a {bg} background" + (f" in {style} style" if style else "")
        out.append(Prompt(text, Scene((replace(obj, position=pos, texture=None),), bg), i))
    return out[:n]


def both_prompts(texture: str, trigger: str, n: int = 20) -> list[Prompt]:
    """The training prompt with `n` seeds; the scene is the training image's."""
    from studio.world.datasets import textured_object
    from studio.world.grammar import Scene

    obj = textured_object(texture)
    text = f"a large {trigger} on the center on a white background in {trigger} style"
    return [Prompt(text, Scene((obj,), "white"), i) for i in range(n)]


def judge_content(images: list[torch.Tensor], prompts: list[Prompt], own: str, new: str | None) -> dict[str, float]:
    """Shape and colour of the object kept, `new` texture found (None: not asked), `own` texture found (leak)."""
    from studio.world.evaluator import evaluate

    hits: dict[str, list[bool]] = {"shape": [], "colour": [], "leak": []} | ({"new_texture": []} if new else {})
    for image, p in zip(images, prompts):
        judged = evaluate(image, p.scene, texture=new or own)
        hits["shape"].append(bool(judged["objects"][0]["shape"]))
        hits["colour"].append(bool(judged["objects"][0]["colour"]))
        if new:
            hits["new_texture"].append(bool(judged["style_fidelity"]))
        hits["leak"].append(bool(evaluate(image, p.scene, texture=own)["style_fidelity"]) if new else
                            bool(judged["style_fidelity"]))
    return {**{k: round(statistics.mean(v), 4) for k, v in hits.items()},
            "raw": {k: [int(h) for h in v] for k, v in hits.items()}}  # per image, for `studio bench report`


def judge_both(images: list[torch.Tensor], prompts: list[Prompt], own: str) -> dict[str, float]:
    """The training image's object (shape and colour) and its texture, each and together."""
    from studio.world.evaluator import evaluate

    hits: dict[str, list[bool]] = {"shape": [], "colour": [], "texture": [], "reproduced": []}
    for image, p in zip(images, prompts):
        judged = evaluate(image, p.scene, texture=own)
        o = judged["objects"][0]
        row = [bool(o["shape"]), bool(o["colour"]), bool(judged["style_fidelity"])]
        for key, ok in zip(("shape", "colour", "texture"), row):
            hits[key].append(ok)
        hits["reproduced"].append(all(row))
    return {**{k: round(statistics.mean(v), 4) for k, v in hits.items()},
            "raw": {k: [int(h) for h in v] for k, v in hits.items()}}  # per image, for `studio bench report`


def make_generate(model: str, pipe: object, steps: int) -> GenerateFn:
    from studio.generate import GenerateConfig, generate

    def generate_fn(prompts: list[str], seeds: list[int]) -> list[torch.Tensor]:
        images = []
        for at in range(0, len(prompts), BATCH):
            texts, batch_seeds = prompts[at:at + BATCH], seeds[at:at + BATCH]
            config = GenerateConfig(prompt=texts[0], model=model, steps=steps, num_images=len(texts))
            images += list(generate(config, pipe=pipe, output_type="pt", prompts=texts, seeds=batch_seeds).images)
        return images  # (3, H, W) each, in [0, 1]

    return generate_fn


def train_concept(texture: str, trigger: str, name: str, model: str, library: Path, overrides: dict,
                  method_options: dict | None = None) -> dict:
    """Train one B-LoRA from the concept's single render into `library`: its wall clock in seconds, trainable
    parameters and peak training memory (`benches.judging.training_peak`)."""
    from studio.library import Library
    from trainers import BLoRAConfig, TrainConfig, train

    config = TrainConfig(trigger=trigger, name=name, model=model, world_texture=texture, overwrite=True,
                         progress=False, run_dir=str(library / ".runs" / name), **overrides)  # fmt: skip
    with training_peak(config.device) as peak:
        start = time.perf_counter()
        result = train(BLoRAConfig(**(method_options or {})), config, library=Library(library))
        seconds = round(time.perf_counter() - start, 1)
    params = sum(t.numel() for t in result.method.trainable_tensors().values())
    return {"seconds": seconds, "trainable_params": params, **peak}


def _with(pipe: object, library: Path, names: list[str], fn: GenerateFn, prompts: list[Prompt]) -> list[torch.Tensor]:
    from studio.library import Library, load_adapters, unload_adapters

    load_adapters(pipe, names, library=Library(library))
    try:
        return fn([p.text for p in prompts], [p.seed for p in prompts])
    finally:
        unload_adapters(pipe, names)


def bar_rows(model: str, library: Path, generate_fn: GenerateFn, pipe: object, overrides: dict,
             grid: dict[str, list[torch.Tensor]], n: int = 20) -> list[dict]:
    """Train the two concepts and judge every row of the bar for each."""
    from tqdm import tqdm

    trained = {}
    overrides = {"batch_size": 1, **overrides}  # one image, one a step: the paper's --train_batch_size 1
    for texture, trigger in tqdm(CONCEPTS, desc="b_lora bench: training", unit="concept"):
        trained[texture] = train_concept(texture, trigger, f"bar-b-lora-{texture}", model, library, overrides)
    rows = []
    for (texture, trigger), (other, other_trigger) in ((CONCEPTS[0], CONCEPTS[1]), (CONCEPTS[1], CONCEPTS[0])):
        name, other_name = f"bar-b-lora-{texture}", f"bar-b-lora-{other}"
        row: dict = {"method": "b_lora", "kind": "one image", "concept": texture, **trained[texture]}
        prompts = texture_prompts(texture, trigger, n)
        images = _with(pipe, library, [f"{name}-style"], generate_fn, prompts)
        row["style"] = judge_texture(images, prompts, texture)
        grid[f"{name} style"] = images[:10]
        prompts = content_prompts(texture, trigger, other, n)
        images = _with(pipe, library, [f"{name}-content"], generate_fn, prompts)
        row["content_word"] = judge_content(images, prompts, texture, other)
        grid[f"{name} content + word"] = images[:10]
        prompts = content_prompts(texture, trigger, other_trigger, n)
        images = _with(pipe, library, [f"{name}-content", f"{other_name}-style"], generate_fn, prompts)
        row["content_entry"] = judge_content(images, prompts, texture, other)
        grid[f"{name} content + {other} style"] = images[:10]
        prompts = both_prompts(texture, trigger, n)
        images = _with(pipe, library, [f"{name}-content", f"{name}-style"], generate_fn, prompts)
        row["both"] = judge_both(images, prompts, texture)
        grid[f"{name} both"] = images[:10]
        row["missed"] = missed(row)
        rows.append(row)
    return rows


def missed(row: dict) -> list[str]:
    """The bars a concept's row misses: the content bars are judged on the texture word (the issue's row), the style
    entry variant is reported beside it."""
    out = []
    style, content, both = row["style"], row["content_word"], row["both"]
    if style["texture"] < STYLE_BAR:
        out.append("style texture")
    if min(style["shape"], style["colour"], style["position"]) < STYLE_BAR:
        out.append("style shape/colour/position")
    if content["shape"] < SHAPE_BAR:
        out.append("content shape")
    if content["new_texture"] < NEW_TEXTURE_BAR:
        out.append("content new texture")
    if content["leak"] > LEAK_BAR:
        out.append("content leak")
    if both["reproduced"] < BOTH_BAR:
        out.append("both")
    if row["seconds"] > SECONDS_BAR:
        out.append("seconds")
    return out


def bar_table(rows: list[dict]) -> list[str]:
    lines = [
        "| concept | train s | style: texture / shape / colour / position | content + word: shape / colour / "
        "new texture / leak | content + style entry: shape / colour / new texture / leak | both: object+texture "
        "| missed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, w, e, b = r["style"], r["content_word"], r["content_entry"], r["both"]
        cells = [r["concept"], f"{r['seconds']:.0f}",
                 f"{s['texture']:.2f} / {s['shape']:.2f} / {s['colour']:.2f} / {s['position']:.2f}",
                 *(f"{c['shape']:.2f} / {c['colour']:.2f} / {c['new_texture']:.2f} / {c['leak']:.2f}" for c in (w, e)),
                 f"{b['reproduced']:.2f}", ", ".join(r["missed"]) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sweep(model: str, out: Path, *, train_steps: int = 600, n: int = 10, steps: int = 20,
          candidates: tuple[tuple[str, str], ...] = CANDIDATES, texture: str = "stripes",
          overrides: dict | None = None, generate_fn: GenerateFn | None = None) -> list[dict]:
    """Train one concept per candidate pair (one image a step) and measure each block's entry alone (see the module
    docstring); `overrides` are further TrainConfig fields, `generate_fn` replaces the pipeline's sampling."""
    from tqdm import tqdm

    from studio.atomic import write_json, write_text
    from studio.generate import cached_pipeline

    library, trigger = out / "library", "vgl"
    pipe = cached_pipeline(model, "cpu")
    generate_fn = generate_fn or make_generate(model, pipe, steps)
    style_prompts = texture_prompts(texture, trigger, n)
    object_prompts = content_prompts(texture, trigger, None, n)
    base = measure(generate_fn(*_texts(style_prompts)), style_prompts, generate_fn(*_texts(object_prompts)),
                   object_prompts, texture)  # fmt: skip
    rows = []
    for first, second in tqdm(candidates, desc="b_lora block sweep", unit="pair"):
        name = "sweep-" + f"{first}-{second}".replace(".", "").replace("_", "")
        settings = {"train_steps": train_steps, "batch_size": 1, **(overrides or {})}
        seconds = train_concept(texture, trigger, name, model, library, settings,
                                {"content_block": first, "style_block": second})["seconds"]  # fmt: skip
        measured = {}
        for block, entry in ((first, f"{name}-content"), (second, f"{name}-style")):
            measured[block] = measure(_with(pipe, library, [entry], generate_fn, style_prompts), style_prompts,
                                      _with(pipe, library, [entry], generate_fn, object_prompts), object_prompts,
                                      texture)  # fmt: skip
        rows.append({"pair": [first, second], "seconds": seconds, "blocks": measured,
                     **best_roles(measured, base)})  # fmt: skip
        write_json(out / "b-lora-sweep.json", {"base": base, "rows": rows})
    write_text(out / "b-lora-sweep.md", "\n".join(sweep_table(rows, base)) + "\n")
    return rows


def _texts(prompts: list[Prompt]) -> tuple[list[str], list[int]]:
    return [p.text for p in prompts], [p.seed for p in prompts]


def measure(styled: list[torch.Tensor], style_prompts: list[Prompt], placed: list[torch.Tensor],
            object_prompts: list[Prompt], texture: str) -> dict[str, float]:
    """T, P on style prompts and O, L on content prompts (see the module docstring)."""
    style = judge_texture(styled, style_prompts, texture)
    objects = judge_content(placed, object_prompts, texture, None)
    return {"T": style["texture"], "P": round((style["shape"] + style["colour"]) / 2, 4),
            "O": round((objects["shape"] + objects["colour"]) / 2, 4), "L": objects["leak"]}


def separation(content: dict[str, float], style: dict[str, float], base: dict[str, float]) -> float:
    """How well the two entries separate: texture moved by the style entry, object by the content entry, less the
    content entry's texture and the style entry's loss of the asked shape and colour (all against the base)."""
    return round((style["T"] - base["T"]) + (content["O"] - base["O"]) - (content["L"] - base["L"])
                 - (base["P"] - style["P"]), 4)


def best_roles(measured: dict[str, dict[str, float]], base: dict[str, float]) -> dict:
    """The role assignment of a pair's two blocks that separates best: {"content", "style", "score"}."""
    first, second = measured
    options = [(separation(measured[c], measured[s], base), c, s) for c, s in ((first, second), (second, first))]
    score, content, style = max(options)
    return {"content": content, "style": style, "score": score}


def sweep_table(rows: list[dict], base: dict[str, float]) -> list[str]:
    lines = ["| content block | style block | style alone: T / P | content alone: O / L | separation |",
             "|---|---|---|---|---|",
             f"| (base, no adapter) | | {base['T']:.2f} / {base['P']:.2f} | {base['O']:.2f} / {base['L']:.2f} | |"]
    for r in sorted(rows, key=lambda r: -r["score"]):
        s, c = r["blocks"][r["style"]], r["blocks"][r["content"]]
        lines.append(f"| {r['content']} | {r['style']} | {s['T']:.2f} / {s['P']:.2f} | {c['O']:.2f} / {c['L']:.2f} "
                     f"| {r['score']:+.2f} |")
    return lines
