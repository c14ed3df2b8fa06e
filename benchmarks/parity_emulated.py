"""`zsq export`'s parity verdict for onnxruntime on another CPU than this one, over many seeds (issue 42).

What depends on the CPU in the parity check is onnxruntime's integer kernels (MLAS picks them from CPUID: on
x86 without VNNI its u8 x s8 products are summed in saturating int16). So only onnxruntime runs on the other
CPU -- here an emulated one (qemu-user, e.g. ``qemu-x86_64 -cpu EPYC-Rome``: AVX2, no AVX-512, no VNNI);
the zsq model's logits and its float floor are computed natively, where they are cheap, and the verdict uses
the same rule as ``zsq export`` (zsq.export.parity: ``compare_logits`` and ``ParityTolerance.judge``).

    PYTHONPATH=. python benchmarks/parity_emulated.py inputs q --seeds 20 --dir D          # native
    qemu-x86_64 -cpu EPYC-Rome .venv/bin/python benchmarks/parity_emulated.py ort q.onnx --dir D
    PYTHONPATH=. python benchmarks/parity_emulated.py judge --dir D --json out.json      # native
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zsq.export.parity import (ParityTolerance, compare_logits, default_check_images, numeric_floor,  # noqa: E402
                               run_torch)


def cpu_seen() -> dict:
    """What this process's CPU says it has (CPUID through numpy, and torch's kernel choice): under qemu-user
    the emulated CPU, not the host's /proc/cpuinfo."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as f
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as f
    keys = ("AVX2", "AVX512F", "AVX512_SKX", "AVX512VNNI", "AVX_VNNI", "AMX_INT8")
    return {"cpuid": {k: bool(f.get(k, False)) for k in keys},
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def inputs(args) -> None:
    from zsq.export import load_quantized

    torch.set_num_threads(1)
    q = load_quantized(args.checkpoint)
    size = q.zsq_meta.input_size
    n = args.n or default_check_images(size)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seeds):
        x = torch.randn(n, *size, generator=torch.Generator().manual_seed(seed))  # zsq export --seed SEED's inputs
        np.save(d / f"seed{seed}_x.npy", x.numpy())
        np.save(d / f"seed{seed}_zsq.npy", run_torch(q, x, 64))
        (d / f"seed{seed}_floor.json").write_text(json.dumps({"float_floor": numeric_floor(q, x), "n": n}))
    (d / "native_cpu.json").write_text(json.dumps(cpu_seen()))


def ort(args) -> None:
    from zsq.export.runtimes import open_runtime, run_batches

    d = Path(args.dir)
    rt = open_runtime("ort", args.onnx, 1)
    for xf in sorted(d.glob("seed*_x.npy")):
        t0 = time.time()
        np.save(xf.with_name(xf.name.replace("_x.npy", "_ort.npy")), run_batches(rt, np.load(xf), 64))
        print(f"{xf.name}: {time.time() - t0:.1f} s", flush=True)
    (d / "ort_cpu.json").write_text(json.dumps({**cpu_seen(), "ort_version": rt.version}))


def judge(args) -> None:
    d = Path(args.dir)
    tol, rows = ParityTolerance(), []
    for ff in sorted(d.glob("seed*_floor.json"), key=lambda p: int(p.name[4:].split("_")[0])):
        seed = int(ff.name[4:].split("_")[0])
        got_f = d / f"seed{seed}_ort.npy"
        if not got_f.exists():
            continue
        meta = json.loads(ff.read_text())
        floor, n = meta["float_floor"], meta["n"]
        res = compare_logits(np.load(d / f"seed{seed}_zsq.npy"), np.load(got_f), None)
        agrees, p = tol.judge(res["top1_agreement"], floor, n)
        logits_ok = res["max_rel_logit_diff"] <= tol.max_rel_logit_diff
        rows.append({"seed": seed, "n": n, "float_floor": floor,
                     "disagreements": int(round((1.0 - res["top1_agreement"]) * n)),
                     "max_disagreements": tol.max_disagreements(floor, n), "p": p,
                     "max_rel_logit_diff": res["max_rel_logit_diff"],
                     "verdict": "pass" if agrees and logits_ok else "fail"})
        print(json.dumps(rows[-1]))
    out = {"native_cpu": json.loads((d / "native_cpu.json").read_text()),
           "ort_cpu": json.loads((d / "ort_cpu.json").read_text()), "rows": rows,
           "verdicts": sorted({r["verdict"] for r in rows})}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("inputs")
    a.add_argument("checkpoint")
    a.add_argument("--seeds", type=int, default=20)
    a.add_argument("--n", type=int, default=None)
    a.add_argument("--dir", required=True)
    b = sub.add_parser("ort")
    b.add_argument("onnx")
    b.add_argument("--dir", required=True)
    c = sub.add_parser("judge")
    c.add_argument("--dir", required=True)
    c.add_argument("--json")
    args = ap.parse_args()
    {"inputs": inputs, "ort": ort, "judge": judge}[args.cmd](args)


if __name__ == "__main__":
    main()
