"""`zsq export DIR --onnx FILE`: checkpoint -> QDQ ONNX, checked in onnxruntime against zsq."""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from zsq.errors import ZsqError

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a quantized checkpoint to ONNX (QDQ) and check it in onnxruntime")
    p.add_argument("checkpoint", help="a directory written by `zsq quantize --out DIR`")
    p.add_argument("--onnx", required=True, help="ONNX file to write")
    p.add_argument("--check-data", help="real labelled images to compare onnxruntime with zsq on "
                                        "(.npz / labels.csv folder / ImageFolder, PATH[START:STOP]); "
                                        "default: random inputs")
    p.add_argument("--num-check", type=int, default=None,
                   help="images to compare (default: 1024 at CIFAR-like input sizes, 256 at ImageNet sizes; "
                        "zsq.export.parity.DEFAULT_CHECK_IMAGES)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check inputs without --check-data "
                                                       "(default 0)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="least top-1 agreement accepted (default: judged against the model's own float floor, its "
                        "agreement with its float64 copy on the same images, less 1 point, with the binomial "
                        "spread of the number of images: fails only at p < 0.001; docs/export.md)")
    p.add_argument("--max-rel-logit-diff", type=float, default=0.5,
                   help="largest |logit diff| / logit std accepted (default 0.5)")
    p.add_argument("--opset", type=int, default=21,
                   help="ONNX opset 13-21 (default 21: weights that fit 4 bits as INT4/UINT4; 17 for older runtimes)")
    p.add_argument("--weight-dtype", choices=("portable", "int8"), default="portable",
                   help="portable (default): 8-bit weights stored as uint8, exact in onnxruntime on every CPU; int8: "
                        "about 2x faster there on CPUs with VNNI/AMX, but onnxruntime's kernels on x86 CPUs without "
                        "VNNI saturate and give other results (docs/export.md)")
    p.add_argument("--runtime", default="ort", help="check (and time) in ort, openvino, or all (default ort)")
    p.add_argument("--latency-runs", type=int, default=20, help="timed runs per runtime and batch size (0: none)")
    p.add_argument("--fold", action="store_true",
                   help="fold BatchNorm into the quantized weights first (paper presets: same codes, exact up to "
                        "float rounding) and list the layers a runtime still runs in float")
    p.add_argument("--force", action="store_true", help="overwrite an existing ONNX file")
    p.add_argument("--threads", type=int, default=2, help="runtime threads (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    from zsq.cli import add_log_args

    add_log_args(p)
    p.set_defaults(func=run)


def _checked_args(args):
    """(onnx path, runtimes, tolerance) once every argument and optional package is checked, before any work."""
    from zsq.errors import require
    from zsq.export.onnx import check_opset
    from zsq.export.parity import ParityTolerance
    from zsq.export.runtimes import parse_runtimes
    from zsq.options import check_run_numbers
    from zsq.runstate import check_output_file

    require("onnx", "onnx")
    require("onnxruntime", "onnx")
    onnx_path = check_output_file(args.onnx, force=args.force, inputs=(args.checkpoint, args.check_data),
                                  option="--onnx", replaceable=is_onnx_model)
    check_run_numbers(num_check=args.num_check, latency_runs=args.latency_runs, threads=args.threads)
    check_opset(args.opset)
    runtimes = parse_runtimes(args.runtime)
    if "openvino" in runtimes:
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise ZsqError("--runtime openvino needs OpenVINO: pip install 'zsq[openvino]'") from None
    return onnx_path, runtimes, ParityTolerance(args.min_agreement, args.max_rel_logit_diff)


def _runtime_check(name: str, qmodel, onnx_file: Path, images, labels, tol, floor: float, args,
                   fp32_file=None) -> dict:
    """One runtime's parity (agreement next to the float floor), integer ops, float layers and latency next
    to the FP32 graph's (``fp32_file``)."""
    from zsq.export.parity import check_parity
    from zsq.export.runtimes import interleaved_latency, open_runtime
    res = check_parity(qmodel, onnx_file, images, labels, tolerance=tol, threads=args.threads, runtime=name,
                       floor=floor)
    if args.latency_runs > 0 and fp32_file is not None:  # timed in turn with the FP32 graph: the ratio is the claim
        res["latency_ms"], res["fp32_latency_ms"], res["speedup_vs_fp32"] = {}, {}, {}
        for b in sorted({1, min(32, images.shape[0])}):
            ms = interleaved_latency({"q": onnx_file, "fp32": fp32_file}, name, args.threads, images[:b].numpy(),
                                     args.latency_runs, spin=False)
            res["latency_ms"][f"batch{b}"], res["fp32_latency_ms"][f"batch{b}"] = round(ms["q"], 3), round(ms["fp32"], 3)
            res["speedup_vs_fp32"][f"batch{b}"] = round(ms["fp32"] / ms["q"], 3)
    logger.info(f"{name}: top-1 agreement {res['top1_agreement']:.4f} (floor {floor:.4f}), integer ops "
        f"{res['integer_ops']}, latency {res.get('latency_ms')}")
    check = {k: res[k] for k in ("runtime_version", "n", "top1_agreement", "disagreements", "agreement_p_value",
                                 "max_logit_diff",
                                 "mean_logit_diff", "max_rel_logit_diff", "integer_ops") if k in res}
    check["float_layers"] = open_runtime(name, onnx_file, 1).float_layers()
    if name == "openvino" and args.weight_dtype == "portable" and check["float_layers"]:
        logger.warning("OpenVINO runs convolutions with uint8 weights in float; --weight-dtype int8 runs them in "
                       "int8 (exact on CPUs with VNNI or AMX only)")
    check.update({k: res[k] for k in ("torch_top1", "onnx_top1", "latency_ms", "fp32_latency_ms", "speedup_vs_fp32")
                  if k in res})
    return check


def is_onnx_model(path: Path) -> bool:
    """An existing file `--force` may replace: an ONNX model (what zsq export writes), nothing else."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises several types on foreign bytes
        return False
    return len(model.graph.node) > 0


def speed_note(checks: dict, threads: int) -> str:
    """What the timings say about speed on this CPU, in words: int8 faster than FP32, or not (then its gain
    here is size only). Empty without timings."""
    from zsq.export.runtimes import cpu_info

    cpu = cpu_info()
    notes = []
    for name, c in checks.items():
        if not c.get("speedup_vs_fp32"):
            continue
        batch, ratio = max(c["speedup_vs_fp32"].items(), key=lambda kv: int(kv[0][5:]))
        where = (f"{name} on this CPU ({cpu['model']}; {', '.join(cpu['flags']) or 'no AVX2'}), {batch}, "
                 f"{threads} thread(s)")
        if ratio < 1.0:
            notes.append(f"the quantized graph is NOT faster than FP32 here: {ratio:.2f}x FP32's speed in {where}; "
                         "its gain on this CPU is size, not speed")
        else:
            notes.append(f"the quantized graph runs {ratio:.2f}x FP32's speed in {where}")
    return "; ".join(notes)


def _check_images(args, meta):
    """(images, labels or None, what they are): --check-data's first --num-check, else seeded random normal
    inputs; --num-check defaults to zsq.export.parity.DEFAULT_CHECK_IMAGES for the input size."""
    import torch

    from zsq.export.parity import default_check_images

    if args.num_check is None:
        args.num_check = default_check_images(meta.input_size)
    if args.check_data:
        from zsq.data import load_images_tensor

        images, labels = load_images_tensor(args.check_data, meta, n=args.num_check)
        return images, labels, f"real:{args.check_data}"
    images = torch.randn(args.num_check, *meta.input_size, generator=torch.Generator().manual_seed(args.seed))
    return images, None, f"random normal inputs, seed {args.seed} (give --check-data for real images)"


def run(args) -> dict:

    from zsq.export.packed_checkpoint import load_quantized
    from zsq.export.onnx import export_float_onnx, export_onnx
    from zsq.export.parity import numeric_floor

    t0 = time.time()
    onnx_path, runtimes, tol = _checked_args(args)
    qmodel = load_quantized(args.checkpoint)
    meta = getattr(qmodel, "zsq_meta", None)
    if meta is None:
        raise ZsqError(f"checkpoint {args.checkpoint} has no model metadata (input size); cannot export it")
    images, labels, source = _check_images(args, meta)
    floor = numeric_floor(qmodel, images)
    folded, to_export = [], qmodel
    if args.fold:
        from zsq.export.fold import fold_quantized_batchnorm

        to_export, folded = fold_quantized_batchnorm(qmodel, images[:4])
        logger.info(f"folded {len(folded)} BatchNorm layers into the quantized weights")
    import os
    import tempfile

    # a fresh name next to the target (never a user's file), renamed over it once every check passed
    onnx_path.parent.mkdir(parents=True, exist_ok=True)  # --onnx names the file; its folder may be new
    fd, tmp_name = tempfile.mkstemp(prefix=f".{onnx_path.name}.", suffix=".zsq-partial",
                                    dir=str(onnx_path.parent) if str(onnx_path.parent) else ".")
    os.close(fd)
    tmp = Path(tmp_name)
    checks = {}
    try:
        info = export_onnx(to_export, tmp, opset=args.opset, weight_dtype=args.weight_dtype)
        logger.info(f"wrote {info['onnx_bytes']} bytes (opset {args.opset}, {len(info['int4_weights'])} INT4/UINT4 weights), "
            f"ops {info['ops']}; comparing on {images.shape[0]} images; float floor {floor:.4f}")
        if info["uint8_shifted_weights"]:
            logger.info(f"{len(info['uint8_shifted_weights'])} layers' 8-bit weights are stored as uint8 (exact on every "
                        "CPU; about 2x slower than int8 on CPUs with VNNI): quantize at 7 weight bits (e.g. --bits "
                        "w7a8) for int8 kernels exact everywhere, or export with --weight-dtype int8 for VNNI-only CPUs")
        if args.weight_dtype == "int8":
            logger.warning("--weight-dtype int8: the graph gives the zsq model's results only on CPUs with VNNI or AMX "
                           "(and non-x86 CPUs); x86 CPUs without VNNI give other results")
        with tempfile.TemporaryDirectory(prefix="zsq-fp32-") as scratch:
            fp32_tmp = None
            if args.latency_runs > 0:  # the float network's graph (system temp), timed in turn with the quantized one
                fp32_tmp = Path(scratch) / "fp32.onnx"
                export_float_onnx(qmodel, fp32_tmp, meta.input_size)
            for name in runtimes:
                checks[name] = _runtime_check(name, qmodel, tmp, images, labels, tol, floor, args, fp32_tmp)
        tmp.replace(onnx_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    note = speed_note(checks, args.threads)
    if note:
        (logger.warning if "NOT faster" in note else logger.info)(note)
    ck = getattr(qmodel, "zsq_checkpoint", {})
    first = checks[runtimes[0]]
    return {"checkpoint": str(args.checkpoint), "onnx": str(onnx_path), "onnx_bytes": info["onnx_bytes"],
            "opset": info["opset"], "weight_dtype": info["weight_dtype"],
            "uint8_shifted_weights": len(info["uint8_shifted_weights"]), "int4_weights": len(info["int4_weights"]), "model": ck.get("model_name"),
            "bits": ck.get("bits"), "preset": ck.get("preset"),
            "check_data": source, "n": first["n"], "float_floor": floor,
            "top1_agreement": first["top1_agreement"], "max_logit_diff": first["max_logit_diff"],
            "mean_logit_diff": first["mean_logit_diff"], "max_rel_logit_diff": first["max_rel_logit_diff"],
            **({"torch_top1": first["torch_top1"], "onnx_top1": first["onnx_top1"]} if labels is not None else {}),
            "runtimes": checks, "folded_bn": folded, **({"speed": note} if note else {}),
            "tolerance": {"min_agreement": tol.bar(floor, first["n"]), "floor_margin": tol.floor_margin,
                          "alpha": tol.alpha, "max_disagreements": tol.max_disagreements(floor, first["n"]),
                          "max_rel_logit_diff": tol.max_rel_logit_diff},
            "ops": info["ops"], "seconds": round(time.time() - t0, 2)}
