"""`zsq synthesize`: make a SyntheticSet from a model alone. zsq.cli registers it via add_parser
and prints the dict run() returns (one JSON object with --json); run() itself prints nothing."""
from __future__ import annotations

import argparse

from zsq.budget_names import BUDGET_NAMES
from zsq.synth.base import list_synthesizers


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synthesize", help="synthesize calibration images from a model alone",
                              description="Synthesize images from the model's BatchNorm statistics "
                                          "(no real data) and save them as a SyntheticSet directory.")
    from zsq.cli import MODEL_HELP, add_factory_args

    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--weights", default=None, help="checkpoint to load instead of the default weights")
    from zsq.cli import add_init_args

    add_init_args(p)
    add_factory_args(p)
    p.add_argument("--method", required=True, choices=list_synthesizers())
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--budget", choices=BUDGET_NAMES, default="quick")
    p.add_argument("--iters", type=int, default=None, help="iterations per batch (gdfq: generator steps)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (checkpoints, images, meta.json, grid.png)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--swap-lr", action="store_true", help="genie: the official code's swapped learning rates")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one field of the method's config, e.g. head=linear (repeatable)")
    from zsq.cli import add_compute_args

    add_compute_args(p)
    p.add_argument("--workers", type=int, default=None,
                   help="split the batches over N processes (runs this command under torchrun; same images)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    from zsq.cli import add_log_args

    add_log_args(p)
    p.set_defaults(func=run)
    return p


def run(args) -> dict:
    from zsq.cli import load_model
    from zsq.cli.checks import parse_set
    from zsq.synth import synthesize

    from zsq.compute import resolve
    from zsq.runstate import check_writable_dir

    from pathlib import Path

    from zsq import distributed as zdist
    from zsq.errors import ZsqError
    from zsq.runlock import LOCK_FILE, RunLock

    compute = resolve(args.device, args.precision, args.channels_last, args.compile)
    out = check_writable_dir(args.out)  # --out FILE / unwritable: refused before any work
    if not args.resume and out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        # the set's files would replace a user's files of the same names
        raise ZsqError(f"--out {out} exists and is not empty (use --resume to continue a synthesis there, or "
                       "another --out)")
    teacher = load_model(args)
    options = parse_set(getattr(args, "set", None))
    if getattr(args, "swap_lr", False):
        options["swap_lr"] = True
    lock, made = None, not out.exists()
    if zdist.rank() == 0:  # one command per folder (the other ranks belong to this one)
        Path(out).mkdir(parents=True, exist_ok=True)
        lock = RunLock(out).acquire()
    try:
        data = synthesize(teacher, args.method, args.num_images, budget=args.budget, iters=args.iters,
                          batch_size=args.batch_size, seed=args.seed, out=args.out, resume=args.resume,
                          compute=compute, **options)
    finally:
        if lock is not None:
            lock.release()
            if made and not any(out.iterdir()):  # refused before writing: nothing left behind
                out.rmdir()
    m = data.meta
    result = {"method": m["method"], "model": m["model"], "num_images": len(data), "seconds": m["seconds"],
              "images_per_second": m["images_per_second"], "bns_loss": m["bns_loss"], "losses": m["losses"],
              "budget": m["budget"], "seed": m["seed"], "out": str(args.out),
              "compute": m["compute"]}
    return result  # zsq.cli.main prints it (one JSON object with --json)
