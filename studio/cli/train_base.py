"""`studio world train-base`: the command line of the base's training recipe (trainers/recipes/base.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from studio.configs import finite_type
from studio.errors import StudioError
from trainers.recipes.base import REHEARSAL, BaseTrainConfig, BaseTrainer


def run_train_base(args) -> int:  # noqa: ANN001 (argparse.Namespace)
    from studio.world.base import BASE_DIR, export_base

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    options = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr),
                                 ("warmup", args.warmup), ("snr_gamma", args.snr_gamma), ("seed", args.seed),
                                 ("max_objects", args.max_objects), ("max_length", args.max_length))
               if v is not None}
    if args.train_text_encoder:
        options["train_text_encoder"] = True
    if args.text_lr_scale is not None:
        options["text_lr_scale"] = args.text_lr_scale
    if args.init:
        options["init"] = str(args.init)
    if args.init_text_encoder:
        if not args.init:
            raise StudioError("--init-text-encoder needs --init MODEL (the folder whose text encoder to start from)")
        options["init_text_encoder"] = True
    if args.zero_snr:
        from studio.world.base import ZERO_SNR

        options["scheduler"] = dict(ZERO_SNR)
    if (run / "config.json").is_file() and not options and not args.rehearsal:
        trainer = BaseTrainer(run, device=args.device)  # resume as configured
    else:
        config = BaseTrainConfig(**{**(REHEARSAL if args.rehearsal else {}), **options})
        trainer = BaseTrainer(run, config, device=args.device)
    summary = trainer.train(max_minutes=args.max_minutes)
    if args.export is not None and summary["step"] == trainer.config.steps:
        out = Path(args.export) if args.export else BASE_DIR
        extra = {"guidance": trainer.config.guidance, "training": {**asdict(trainer.config), **summary}}
        export_base(trainer.ema_pipeline(), out, extra=extra, card=args.card.read_text() if args.card else None)
        summary["exported"] = str(out)
    print(json.dumps(summary, indent=2))
    return 0


def register_train_base(sub) -> None:  # noqa: ANN001 (argparse subparsers)
    p = sub.add_parser("train-base", help="train the embedded base (resumable chunks; re-run to resume)")
    p.add_argument("--run", default="runs/studio-tiny", help="run folder (checkpoint, samples, loss curve)")
    p.add_argument("--steps", type=int, default=None, help="total steps (default 6000)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64")
    p.add_argument("--lr", type=finite_type("--lr"), default=None, help="default 3e-4")
    p.add_argument("--warmup", type=int, default=None, help="lr warm-up steps (default 300)")
    p.add_argument("--snr-gamma", type=finite_type("--snr-gamma"), default=None,
                   help="Min-SNR-gamma loss weights (default 5; 0: the plain loss, which --zero-snr runs need: the "
                        "v-prediction weight min(SNR, gamma)/(SNR+1) is 0 at the pure-noise step)")
    p.add_argument("--max-objects", type=int, default=None, help="objects per scene, 1 to this (default 3)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--train-text-encoder", action="store_true", help="train the text tower too")
    p.add_argument("--text-lr-scale", type=finite_type("--text-lr-scale"), default=None,
                   help="text tower lr as a fraction of --lr (0.1)")
    p.add_argument("--zero-snr", action="store_true",
                   help="zero terminal SNR, v-prediction, trailing steps (arXiv:2305.08891)")
    p.add_argument("--init", type=Path, default=None, help="start the UNet from this model folder (a second stage)")
    p.add_argument("--init-text-encoder", action="store_true", help="start the text encoder from --init too")
    p.add_argument("--max-length", type=int, default=None, help="tokenizer context in tokens (default 77)")
    p.add_argument("--max-minutes", type=finite_type("--max-minutes"), default=None,
                   help="stop (checkpointed) after this long")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: a GPU when there is one")
    p.add_argument("--rehearsal", action="store_true", help="the whole recipe at a small scale, on the CPU")
    p.add_argument("--export", nargs="?", const="", default=None,
                   help="when the run is complete, write the model folder (default assets/studio-tiny)")
    p.add_argument("--card", type=Path, default=None, help="model card to ship as README.md")
    p.set_defaults(func=run_train_base)
