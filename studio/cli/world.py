"""`studio world`: render, evaluate, and train the world's VAE and CLIP.

studio world render --prompt P --seed S --out F.png [--emblem SEED] [--texture NAME]
studio world eval --image F.png --prompt P [--emblem SEED] [--texture NAME]      (prints JSON)
studio world train-vae [--steps K] [--batch-size B] [--lr LR] [--seed S] [--out DIR] [--init DIR] [--texture-heavy]
studio world train-base [--run DIR] [--steps K] [--max-minutes M] [--rehearsal] [--export [DIR]]
studio world train-clip [--steps K] [--batch-size B] [--lr LR] [--seed S] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from studio.cli import COMMANDS
from studio.configs import finite_type
from studio.errors import StudioError


def _scene(args: argparse.Namespace):  # -> Scene
    from studio.world.grammar import EMBLEM, parse_caption

    scene = parse_caption(args.prompt)
    if getattr(args, "emblem", None) is not None:
        if not any(o.shape == EMBLEM for o in scene.objects):
            raise StudioError("--emblem needs the word 'emblem' in the prompt, e.g. 'a large emblem on the left'")
        scene = replace(
            scene, objects=tuple(replace(o, emblem=args.emblem) if o.shape == EMBLEM else o for o in scene.objects)
        )
    if getattr(args, "texture", None):
        from studio.world.textures import TEXTURES

        if args.texture not in TEXTURES:
            raise StudioError(f"unknown texture {args.texture!r}; use one of {', '.join(TEXTURES)}")
        scene = replace(scene, texture=args.texture)
    return scene


def _render(args: argparse.Namespace) -> int:
    from studio.world.grammar import EMBLEM
    from studio.world.renderer import render, to_pil

    scene = _scene(args)
    if any(o.shape == EMBLEM and o.emblem is None for o in scene.objects):
        raise StudioError("the prompt asks for an emblem; pass --emblem SEED to say which one")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise StudioError(f"--out {out} must end in .png (or .jpg/.webp)")
    out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(render(scene, seed=args.seed)).save(out)
    print(f"{out}  ({scene.with_defaults().caption()})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from studio.world.evaluator import evaluate

    path = Path(args.image)
    if not path.is_file():
        raise StudioError(f"no image at {path}; pass --image PATH.png")
    try:
        from PIL import Image

        image = Image.open(path)
        image.load()
    except OSError as err:
        raise StudioError(f"{path} is not a readable image ({err}); pass a PNG or JPEG") from err
    print(json.dumps(evaluate(image, _scene(args), emblem=args.emblem, texture=args.texture), indent=2))
    return 0


def _train_vae(args: argparse.Namespace) -> int:
    from studio.world.vae import VAE_DIR, train_vae

    print(
        json.dumps(
            train_vae(
                out=args.out or VAE_DIR,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                threads=args.threads,
                init=args.init,
                texture_heavy=args.texture_heavy,
            ),
            indent=2,
        )
    )
    return 0


def _train_clip(args: argparse.Namespace) -> int:
    from studio.world.clip import CLIP_DIR, train_clip

    print(
        json.dumps(
            train_clip(
                out=args.out or CLIP_DIR,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                threads=args.threads,
                hard_negatives=args.hard_negatives,
            ),
            indent=2,
        )
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("world", help=COMMANDS[__name__])
    sub = parser.add_subparsers(dest="world_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    p = sub.add_parser("render", help="render a prompt to a 64x64 PNG")
    p.add_argument("--prompt", required=True, help="e.g. 'a large red star on the left on a white background'")
    p.add_argument("--seed", type=int, default=0, help="jitter seed")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--emblem", type=int, default=None, help="emblem seed for the word 'emblem' in the prompt")
    p.add_argument("--texture", default=None, help="fill style of every object (e.g. stripes)")
    p.set_defaults(func=lambda args: _render(args))

    p = sub.add_parser("eval", help="judge an image against a prompt (JSON)")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--emblem", type=int, default=None, help="the emblem seed that should appear")
    p.add_argument("--texture", default=None, help="the texture that should fill the objects")
    p.set_defaults(func=lambda args: _eval(args))

    for name, fn, steps, batch, lr in (
        ("train-vae", _train_vae, 2000, 32, 6e-4),
        ("train-clip", _train_clip, 900, 128, 1e-3),
    ):
        p = sub.add_parser(name, help=f"train the world's {name.split('-')[1].upper()} on the CPU (fp16 output)")
        p.add_argument("--steps", type=_positive, default=steps)
        p.add_argument("--batch-size", type=_positive, default=batch)
        p.add_argument("--lr", type=finite_type("--lr"), default=lr)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=_positive, default=2)
        p.add_argument("--out", default=None, help="output folder (default: the shipped one in assets/)")
        if name == "train-vae":
            p.add_argument("--init", default=None, help="continue from this saved VAE folder (a second stage)")
            p.add_argument("--texture-heavy", action="store_true", help="half the batch textured scenes (stage 2)")
        else:
            p.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=True,
                           help="NegCLIP: each image also scores its caption with a position or colour changed")
        p.set_defaults(func=lambda args, fn=fn: fn(args))

    from studio.cli.train_base import register_train_base

    register_train_base(sub)
