"""Why zsq stores 8-bit weights as uint8 by default: the same deploy W8A8 models exported with
``--weight-dtype int8`` and ``portable`` (and the W7A8 models, int8 in the portable file), compared with
the fake-quant model in onnxruntime and OpenVINO (when installed) on this CPU.

    PYTHONPATH=. python benchmarks/int8_saturation.py                                   # this CPU
    PYTHONPATH=. qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/int8_saturation.py  # an AVX2 CPU without VNNI

(qemu-x86_64 is Debian's qemu-user; its TCG emulates AVX2 but not VNNI, and onnxruntime picks its
kernels from CPUID, so it runs the AVX2 u8 x s8 kernels.) Models: the test suite's tiny ResNet and
BatchNormAct net (random init, calibrated on random images) and zsq's CIFAR ResNet-20 (the shared
checkpoint, bn-minmax: no images) when the assets are present.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import torch

from tests.tiny_models import tiny_images, tiny_quantized
from zsq.export.onnx import export_onnx
from zsq.export.parity import compare_logits, run_torch
from zsq.export.runtimes import cpu_has_int8_dot, open_runtime, run_batches


def models(bits: str):
    yield "tiny_resnet", tiny_quantized("deploy", bits), tiny_images(64, seed=4)
    from tests.quant.test_bn_act import BatchNormAct2d, _net
    from zsq.quant import calibrate, get_preset, quantize_model
    from zsq.quant import modules as qmodules

    saved = qmodules.BN_ACT_TYPES  # the test's stand-in for timm's BatchNormAct2d folds, as in the test
    qmodules.BN_ACT_TYPES = saved | {(BatchNormAct2d.__module__, "BatchNormAct2d")}
    try:
        q = quantize_model(_net(), get_preset("deploy", bits))
    finally:
        qmodules.BN_ACT_TYPES = saved
    calibrate(q, tiny_images(32, seed=7), batch_size=16)
    yield "bn_act_net", q, tiny_images(64, seed=4)
    import zsq.assets as A

    try:
        weights = A.asset(A.RESNET20)
    except Exception:
        return
    import zsq
    from zsq.models import load

    fp = load("cifar10_resnet20", weights=weights)
    q = zsq.quantize(fp, method="bn-minmax", preset="deploy", bits=bits).model
    yield "cifar10_resnet20", q, torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    runtimes = ["ort"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    with tempfile.TemporaryDirectory(prefix="zsq-sat-") as d:
        for bits, dtypes in (("w8a8", ("int8", "portable")), ("w7a8", ("portable",))):
            for name, q, x in models(bits):
                ref = run_torch(q, x, 64)
                for dtype in dtypes:
                    path = Path(d) / f"{name}_{bits}_{dtype}.onnx"
                    export_onnx(q, path, weight_dtype=dtype)
                    for rt_name in runtimes:
                        rt = open_runtime(rt_name, path, 1)
                        c = compare_logits(ref, run_batches(rt, x, 64))
                        rows.append({"model": name, "bits": bits, "weight_dtype": dtype, "runtime": rt_name,
                                     "version": rt.version, "n": c["n"], "cpu_int8_dot": cpu_has_int8_dot(),
                                     "top1_agreement": c["top1_agreement"],
                                     "max_rel_logit_diff": float(f"{c['max_rel_logit_diff']:.4g}"),
                                     "integer_ops": rt.integer_ops()})
                        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
