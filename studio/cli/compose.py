"""`studio compose`: `studio generate` with several library adapters and a composer (merge, switch, composite, cmlora).

Adapters come from `--adapters NAME[:W][,NAME[:W]...]` and from `<lora:name:w>` tags in the prompt; each PNG
records the adapters, the composer and its settings.
"""

from __future__ import annotations

import argparse
import sys

from studio.cli import COMMANDS
from studio.cli.options import add_dataclass_arguments, from_namespace


def register(subparsers: argparse._SubParsersAction) -> None:
    from studio.generate import GenerateConfig

    parser = subparsers.add_parser("compose", help=COMMANDS[__name__])
    add_dataclass_arguments(parser, GenerateConfig, required=("prompt",))
    parser.add_argument(
        "--adapters",
        default="",
        metavar="NAME[:W],...",
        help="library adapters and weights, e.g. corgi:0.8,watercolor (prompt tags add more)",
    )
    parser.add_argument(
        "--composer",
        default="merge",
        metavar="NAME",
        help="how the adapters combine: merge (default), switch, composite, cmlora, multidiffusion (boxes), "
        "lora_composer (boxes), clora or autolora (no adapters named: retrieved by the prompt)",
    )
    parser.add_argument("--tau", type=int, default=None, help="switch: steps each adapter stays active (default 5)")
    parser.add_argument(
        "--order",
        default=None,
        metavar="A,B,...",
        help="switch: adapter order (default subject, style, content, then the rest); cmlora: integration order "
        "(default measured by Fourier profiling)",
    )
    parser.add_argument("--no-cache", action="store_true",
                        help="cmlora: every adapter runs the full UNet every step (no feature reuse)")
    parser.add_argument("--c1", type=int, default=None,
                        help="cmlora: refresh interval on the first 37.5%% and last 12.5%% of the steps (default 2)")
    parser.add_argument("--c2", type=int, default=None,
                        help="cmlora: refresh interval on the middle half of the steps (default 3)")
    parser.add_argument(
        "--box",
        action="append",
        default=None,
        metavar="NAME:x0,y0,x1,y1",
        help="multidiffusion, lora_composer: the region of an adapter in image fractions, origin top-left "
        "(repeatable), e.g. sks:0,0.1,0.5,0.9; without any, each subject's box comes from its clause's position "
        "words (`sks emblem on the left`: 0,0.25,0.5,0.75)",
    )
    parser.add_argument(
        "--region",
        action="append",
        default=None,
        metavar="PROMPT:x0,y0,x1,y1",
        help="multidiffusion: a region prompt and its box (repeatable), denoised with the adapters that act "
        "everywhere; without any, an adapter holding several concepts (a merge of orthogonal adapters) gets one "
        "region per placed clause of the prompt",
    )
    parser.add_argument("--concept-masks", action="store_true",
                        help="clora: masks from each subject's own words (the paper's) instead of its position words "
                        "(for bases whose noun attention maps localise)")
    parser.add_argument("--fused", action="store_true", help="merge: bake the weighted sum into the weights")
    parser.add_argument(
        "--schedule",
        default="constant",
        metavar="SPEC",
        help="per-step weight multiplier for every adapter: constant or linear:START:END",
    )
    parser.add_argument("--out", required=True, help="output FILE.png (several images: FILE-000.png... + grid)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import composers
    from composers.layout import placement_tip
    from studio.generate import GenerateConfig, cached_pipeline, memory_plan, output_paths, resolve_device, save_result

    args.prompt, adapters, composer_config = composers.from_options(
        args.prompt, args.adapters, args.composer, tau=args.tau, order=args.order, fused=args.fused,
        schedule=args.schedule, no_cache=args.no_cache, c1=args.c1, c2=args.c2, boxes=args.box,
        concept_masks=args.concept_masks, regions=args.region,
    )
    if args.composer == "autolora" and not args.adapters.strip() and adapters.names:
        print(f"retrieved: {', '.join(adapters.names)} (prompt: {args.prompt!r})", file=sys.stderr)
    tip = placement_tip(args.prompt, adapters, args.composer)
    if tip:
        print(tip, file=sys.stderr)
    config = from_namespace(GenerateConfig, args)
    output_paths(args.out, config.num_images)  # a bad --out fails before any work
    pipe = cached_pipeline(config.model, resolve_device(config.device))  # load (and fail) before the progress bar
    memory_plan(config, pipe)  # and refuse what cannot fit in memory
    with tqdm(total=config.steps, desc=f"compose ({args.composer})", unit="step") as bar:
        result = composers.compose(
            config,
            adapters,
            args.composer,
            composer_config,
            pipe=pipe,
            progress=lambda step, total: bar.update(step - bar.n),
        )
    if args.schedule != "constant":
        result.params = [{**p, "schedule": args.schedule} for p in result.params]
    for path in save_result(result, args.out):
        print(path)
    return 0
