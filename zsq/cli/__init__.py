"""The `zsq` command line: evaluate, quantize, inspect, methods here; synthesize, export and bench in
this package's modules of those names (each provides add_parser(subparsers) and run(args) -> dict).

User-input problems (ZsqError) print one line `zsq: error: ...` and exit with code 2; nothing is
written. A bug in zsq (InternalError) prints `zsq: internal error: ...` and a request to report it, exit 3. `--json` prints one JSON object on stdout; progress and logs go to stderr.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from zsq.budget_names import BUDGET_NAMES
from zsq.cli.checks import parse_set  # noqa: F401  (also zsq.cli.parse_set for the subcommands)
from zsq.errors import InternalError, ZsqError
from zsq.progress import cli_logging

# sub-commands with a module of their own: each provides add_parser(subparsers) and run(args) -> dict
_SUBCOMMAND_MODULES = ("zsq.cli.synthesize", "zsq.cli.export", "zsq.cli.bench")


MODEL_HELP = ("model name (cifar10_resnet20, efficientnet_lite0, torchvision:resnet18, timm:...) or your own "
              "model's factory: path/to/file.py:build_fn or package.module:build_fn")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--weights", help="local checkpoint to load (state_dict read with weights_only=True; "
                                     "'module.' prefixes stripped)")
    add_init_args(p)
    add_factory_args(p)


def add_factory_args(p: argparse.ArgumentParser) -> None:
    """--input-size / --mean / --std / --num-classes: a factory model's metadata (zsq.models.factory)."""
    p.add_argument("--input-size", metavar="C,H,W", help="input size of a factory model without zsq metadata")
    p.add_argument("--mean", metavar="M1,M2,M3", help="per-channel mean of [0, 1] pixels (factory models)")
    p.add_argument("--std", metavar="S1,S2,S3", help="per-channel std of [0, 1] pixels (factory models)")
    p.add_argument("--num-classes", type=int, help="classes of a factory model whose output is not (N, classes)")


def factory_kwargs(args: argparse.Namespace) -> dict:
    """The factory metadata flags as zsq.models.load keywords (None where not given)."""
    return {k: getattr(args, k, None) for k in ("input_size", "mean", "std", "num_classes")}


def add_init_args(p: argparse.ArgumentParser) -> None:
    """--pretrained / --random-init: without --weights one of them must say where the weights come from."""
    p.add_argument("--pretrained", action="store_true",
                   help="zsq models: the reference weights in the shared assets; torchvision:/timm:/pytorchcv: "
                        "the package's own download")
    p.add_argument("--random-init", action="store_true",
                   help="run a randomly initialised network on purpose (refused otherwise when no weights are given)")


def add_compute_args(p: argparse.ArgumentParser) -> None:
    """--device / --precision / --channels-last / --compile (zsq.compute.resolve)."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu; results on "
                                                   "other devices are not bit-identical to cpu)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="fp32 (default, bit-reproducible), bf16 (autocast; quantizers, BN statistics, losses "
                        "and optimizers stay fp32) or auto (bf16 where the hardware has it natively)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory layout (default: on with bf16, off with fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the teacher's synthesis step and the reconstruction units (pays after "
                        "its compile time, see benchmarks/results/compute.md; not bit-identical to eager)")


def add_log_args(p: argparse.ArgumentParser) -> None:
    """--quiet / -v: the level of the `zsq` logger for this command (progress bars show from INFO)."""
    p.add_argument("--quiet", action="store_true", help="warnings only: no progress bars or log lines")
    p.add_argument("-v", "--verbose", action="store_true", help="debug log lines too")


def log_level(args: argparse.Namespace) -> int:
    """WARNING with --quiet (and on every rank but the first), DEBUG with -v, else INFO."""
    from zsq import distributed as zdist

    if getattr(args, "quiet", False) or zdist.env_rank() != 0:
        return logging.WARNING
    return logging.DEBUG if getattr(args, "verbose", False) else logging.INFO


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_log_args(p)


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        from zsq.runstate import to_json

        print(to_json(result, default=str))
        return
    for k, v in result.items():
        if k == "method_report" and isinstance(v, dict):  # the method's own figures (final_top1, bn_k, ...)
            _emit({f"method.{mk}": mv for mk, mv in v.items()}, False)
            continue
        if isinstance(v, float):
            v = f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.2f}"
        if isinstance(v, (dict, list)):
            continue
        print(f"{k:>16}: {v}")


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse to write into an existing, non-empty directory unless forced, or one that cannot be written."""
    from zsq.runstate import check_writable_dir

    if out.exists() and not out.is_dir():
        raise ZsqError(f"--out {out} exists and is not a directory")
    check_writable_dir(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ZsqError(f"--out {out} exists and is not empty (use --force to overwrite, --resume to continue)")


def load_model(args):
    """The model the command names, refusing one without weights unless --random-init."""
    from zsq.models import load_checked

    return load_checked(args.model, weights=args.weights, pretrained=getattr(args, "pretrained", False),
                        random_init=getattr(args, "random_init", False), **factory_kwargs(args))


# ---- evaluate ---------------------------------------------------------------------------------
def cmd_evaluate(args) -> dict:
    from zsq.evaluation import evaluate

    model = load_model(args)
    t0 = time.time()
    res = evaluate(model, args.data, batch_size=args.batch_size)
    return {"model": args.model, "data": args.data, "top1": res["top1"], "top5": res["top5"], "n": res["n"],
            "seconds": round(time.time() - t0, 2)}


# ---- quantize ---------------------------------------------------------------------------------
def cmd_quantize(args) -> dict:
    from zsq.run import (Calibration, ComputeConfig, MethodSpec, ModelSource, Output, QuantSpec, Run, RunBudget,
                         execute)

    out = Path(args.out)
    check_out_dir(out, args.force or args.resume)
    run = Run(model=ModelSource(args.model, weights=args.weights, pretrained=args.pretrained,
                                random_init=args.random_init, **factory_kwargs(args)),
              method=MethodSpec(args.method, parse_set(args.set)), quant=QuantSpec(args.bits, args.preset),
              calibration=Calibration(synth=args.synth, data=args.calib_data, num_images=args.num_images),
              eval_data=args.eval_data, output=Output(out, force=args.force, resume=args.resume),
              compute=ComputeConfig(args.device, args.precision, args.channels_last, args.compile),
              budget=RunBudget(args.budget, iters=args.iters, epochs=args.epochs,
                               iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size),
              seed=args.seed, strict=args.strict)
    return execute(run).report


def cmd_inspect(args) -> dict:
    """The protocol audit: where a preset puts every quantizer on this model, without quantizing."""
    from zsq.ptq.units import find_units
    from zsq.quant import get_preset, quantize_model
    from zsq.quant.transforms import describe_plan

    from zsq.models import load_checked

    # the plan does not depend on the weights: without --weights/--pretrained a seeded random network will do
    model = load_checked(args.model, weights=args.weights, pretrained=args.pretrained,
                         random_init=args.weights is None and not args.pretrained, **factory_kwargs(args))
    q = quantize_model(model, get_preset(args.preset, args.bits), strict=args.strict)
    plan = describe_plan(q)
    plan["model"] = args.model
    plan["units"] = [u.describe() for u in find_units(q, "block")]
    if args.json:
        return plan
    _print_plan(plan)
    return {}


def _print_plan(plan: dict) -> None:
    print(f"{plan['model']}: preset {plan['preset']} {plan['bits']}, capture: {plan['capture']}")
    print(f"layers ({len(plan['layers'])}):")
    for r in plan["layers"]:
        a = f"A{r['a_bits']}" if r["a_bits"] else "input float"
        print(f"  {r['layer']:<40} {r['type']:<18} W{r['w_bits']} {a}")
    print(f"activation quantizers ({len(plan['activation_quantizers'])}):")
    for a in plan["activation_quantizers"]:
        shared = f"  shared by {', '.join(a['used_by'])}" if len(a["used_by"]) > 1 else ""
        print(f"  {a['quantizer']:<48} {a['role']:<16} A{a['bits']} reads {a['reads']}{shared}")
    print(f"residual quantizers: {len(plan['residual_quantizers'])}; shared quantizers: {len(plan['shared'])}")
    for what in ("kept_float", "eager_fallback"):
        rows = plan[what]
        print(f"{what.replace('_', ' ')}: {len(rows)}")
        for r in rows:
            print(f"  {r.get('layer') or r.get('module')}: {r['why']}")
    blocks = [u for u in plan["units"] if u["kind"] == "block"]
    print(f"reconstruction units: {len(plan['units'])} ({len(blocks)} blocks)")


def cmd_methods(args) -> dict:
    from zsq.methods import list_methods
    from zsq.quant import list_presets

    methods = list_methods()
    presets = list_presets()
    from zsq.synth import get_synthesizer, list_synthesizers

    synths = {name: get_synthesizer(name).summary for name in list_synthesizers()}
    if not args.json:
        print("methods:")
        for name, info in methods.items():
            data = "images" if info.needs_images else "no images"
            print(f"  {name:<12} {info.kind:<12} preset={info.default_preset:<6} ({data}) {info.summary}")
        print("presets:")
        for name, summary in presets.items():
            print(f"  {name:<12} {summary}")
        if synths:
            print("synthesizers:")
            for name, summary in synths.items():
                print(f"  {name:<12} {summary}")
        return {}
    return {"methods": {k: {"kind": v.kind, "needs_images": v.needs_images, "default_preset": v.default_preset,
                            "default_synth": v.default_synth, "summary": v.summary} for k, v in methods.items()},
            "presets": presets, "synthesizers": synths}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsq", description="Zero-shot (data-free) quantization of vision models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evaluate", help="top-1/top-5 of a model on labelled images")
    _add_model_args(p)
    p.add_argument("--data", required=True, help=".npz (uint8 NHWC x, int y), a folder with labels.csv, or an "
                                                  "ImageFolder; PATH[START:STOP] takes a slice")
    p.add_argument("--batch-size", type=int, default=250)
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quantize", help="quantize a model without its training data")
    _add_model_args(p)
    p.add_argument("--method", default="bn-minmax", help="see `zsq methods` (default: bn-minmax)")
    p.add_argument("--bits", default="w4a4", help="wXaY, 2..8 bits each (default w4a4)")
    p.add_argument("--preset", help="protocol preset (default: the method's own)")
    p.add_argument("--synth", help="synthesizer for calibration images (default: the method's own)")
    p.add_argument("--calib-data", help="a saved SyntheticSet dir, or real images (the real-data reference)")
    p.add_argument("--num-images", type=int, help="calibration images to synthesize/use")
    p.add_argument("--budget", choices=BUDGET_NAMES, default="quick")
    p.add_argument("--iters", type=int, help="iterations (per unit for PTQ, per batch for synthesis)")
    p.add_argument("--epochs", type=int, help="QAT epochs")
    p.add_argument("--iters-per-epoch", type=int, help="QAT iterations per epoch")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for the quantized model")
    p.add_argument("--force", action="store_true",
                   help="start over in a non-empty --out: replaces the checkpoint, synthetic set and work "
                        "state an earlier run left there")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--eval-data", help="labelled images to report FP32 and quantized top-1 on")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    add_compute_args(p)
    p.add_argument("--workers", type=int, default=None,
                   help="N processes (runs this command under torchrun): synthesis splits its batches, "
                        "reconstruction each batch's images, QAT its batches (gradients summed over the processes)")
    p.add_argument("--strict", action="store_true",
                   help="refuse layers zsq would keep in float (Conv3d, ConvTranspose2d, LSTM, functional "
                        "F.conv2d/F.linear calls) instead of keeping them in float")
    _add_common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="print where a preset puts every quantizer on a model (protocol audit)")
    _add_model_args(p)
    p.add_argument("--preset", default="genie", help="protocol preset (default genie)")
    p.add_argument("--bits", default="w4a4", help="wXaY (default w4a4)")
    p.add_argument("--strict", action="store_true", help="refuse layers zsq would keep in float")
    _add_common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("methods", help="list methods, presets and synthesizers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    for modname in _SUBCOMMAND_MODULES:
        mod = importlib.import_module(modname)
        before = set(sub.choices)
        mod.add_parser(sub)
        for name in set(sub.choices) - before:  # run(args) -> dict unless add_parser set one
            if sub.choices[name].get_default("func") is None:
                sub.choices[name].set_defaults(func=mod.run)
    return parser


def os_error_line(e: OSError, args: argparse.Namespace) -> str:
    """An OSError as one line naming the file; where the command resumes, that what was saved is kept."""
    import errno
    import os

    what = e.strerror or os.strerror(e.errno) if e.errno else (e.strerror or str(e) or type(e).__name__)
    name = e.filename if e.filename is not None else ""
    if isinstance(name, (str, bytes)) and len(name) > 200:
        name = f"{name[:80]!s}...{name[-80:]!s} ({len(name)} characters)"
    line = f"{what}: {name}" if name else str(what)
    if e.errno == errno.ENOSPC:
        line += " (free some space)"
    if hasattr(args, "resume") and e.errno not in (errno.ENAMETOOLONG,):
        line += "; what was saved before is kept: run the same command with --resume to continue"
    return line


def main(argv: Optional[List[str]] = None) -> int:
    from zsq import distributed as zdist

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        from zsq.cli.checks import check_args

        check_args(args)  # before any work, and before --workers starts processes
        workers = getattr(args, "workers", None)
        if workers is not None and not zdist.launched():
            if workers > 1:
                return zdist.launch_workers(workers, zdist.strip_workers(argv))
        zdist.check_supported(args.command)
        if zdist.launched() and hasattr(args, "device"):
            args.device = zdist.init_from_env(args.device)
        with cli_logging(log_level(args)):
            result = args.func(args)
        if result and zdist.env_rank() == 0:  # one answer per command, not one per process
            _emit(result, getattr(args, "json", False))
    except ZsqError as e:
        print(f"zsq: error: {e}", file=sys.stderr)
        return 2
    except InternalError as e:
        print(f"zsq: internal error: {e}\nzsq: this is a bug in zsq, not in your input; please report it with "
              "the command you ran", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("zsq: interrupted (use --resume to continue where supported)", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, a name too long, no permission ... while reading or writing: one line
        print(f"zsq: error: {os_error_line(e, args)}", file=sys.stderr)
        return 2
    finally:
        zdist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
