"""`zsq export DIR --onnx FILE`: checkpoint -> QDQ ONNX, checked in onnxruntime against zsq."""
from __future__ import annotations

import time
from pathlib import Path

from zsq.errors import ZsqError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a quantized checkpoint to ONNX (QDQ) and check it in onnxruntime")
    p.add_argument("checkpoint", help="a directory written by `zsq quantize --out DIR`")
    p.add_argument("--onnx", required=True, help="ONNX file to write")
    p.add_argument("--check-data", help="real labelled images to compare onnxruntime with zsq on "
                                        "(.npz / labels.csv folder / ImageFolder, PATH[START:STOP]); "
                                        "default: random inputs")
    p.add_argument("--num-check", type=int, default=256, help="images to compare (default 256)")
    p.add_argument("--min-agreement", type=float, default=0.99, help="least top-1 agreement accepted (default 0.99)")
    p.add_argument("--max-rel-logit-diff", type=float, default=0.5,
                   help="largest |logit diff| / logit std accepted (default 0.5)")
    p.add_argument("--force", action="store_true", help="overwrite an existing ONNX file")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.set_defaults(func=run)


def run(args) -> dict:
    import torch

    from zsq.export.checkpoint import load_quantized
    from zsq.export.onnx_export import export_onnx
    from zsq.export.parity import ParityTolerance, check_parity
    from zsq.progress import log

    from zsq.errors import require

    t0 = time.time()
    require("onnx", "onnx")
    require("onnxruntime", "onnx")
    onnx_path = Path(args.onnx)
    if onnx_path.is_dir():
        raise ZsqError(f"--onnx {onnx_path} is a directory; give a file name, e.g. {onnx_path / 'model.onnx'}")
    if onnx_path.exists() and not args.force:
        raise ZsqError(f"{onnx_path} exists (use --force to overwrite)")
    from zsq.runstate import check_writable_dir

    check_writable_dir(onnx_path.parent if str(onnx_path.parent) else Path("."))
    if args.num_check < 1:
        raise ZsqError(f"--num-check must be at least 1, got {args.num_check}")
    tol = ParityTolerance(args.min_agreement, args.max_rel_logit_diff)
    qmodel = load_quantized(args.checkpoint)
    meta = getattr(qmodel, "zsq_meta", None)
    if meta is None:
        raise ZsqError(f"checkpoint {args.checkpoint} has no model metadata (input size); cannot export it")
    labels = None
    if args.check_data:
        from zsq.data import load_images_tensor

        images, labels = load_images_tensor(args.check_data, meta, n=args.num_check)
        source = f"real:{args.check_data}"
    else:
        images = torch.randn(args.num_check, *meta.input_size, generator=torch.Generator().manual_seed(0))
        source = "random normal inputs (give --check-data for real images)"
    tmp = onnx_path.with_name(onnx_path.name + ".partial")
    try:
        info = export_onnx(qmodel, tmp)
        log(f"wrote {info['onnx_bytes']} bytes, ops {info['ops']}; comparing on {images.shape[0]} images", args.quiet)
        parity = check_parity(qmodel, tmp, images, labels, tolerance=tol, threads=args.threads)
        tmp.replace(onnx_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    ck = getattr(qmodel, "zsq_checkpoint", {})
    return {"checkpoint": str(args.checkpoint), "onnx": str(onnx_path), "onnx_bytes": info["onnx_bytes"],
            "opset": info["opset"], "model": ck.get("model_name"), "bits": ck.get("bits"),
            "check_data": source, "n": parity["n"], "top1_agreement": parity["top1_agreement"],
            "max_logit_diff": parity["max_logit_diff"], "mean_logit_diff": parity["mean_logit_diff"],
            "max_rel_logit_diff": parity["max_rel_logit_diff"],
            **({"torch_top1": parity["torch_top1"], "onnx_top1": parity["onnx_top1"]} if labels is not None else {}),
            "tolerance": {"min_agreement": tol.min_agreement, "max_rel_logit_diff": tol.max_rel_logit_diff},
            "ops": info["ops"], "seconds": round(time.time() - t0, 2)}
