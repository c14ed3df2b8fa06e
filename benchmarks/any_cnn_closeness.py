"""Issue 13: how close W8A8 stays to float on every model of the any-CNN test, with the numbers the test
bounds (``tests/quant/test_capture.py::w8a8_closeness``: random init, BN statistics from one train-mode
pass on 16 random images, 8 random inputs, bn-minmax ranges; every model: median per-quantizer error; the
ResNets and hand-written models: the logit error, below 5x the float net's own 1 % noise floor).

    PYTHONPATH=$PWD python benchmarks/any_cnn_closeness.py [--only NAME ...]    # a markdown table

About 2 minutes on an idle core for all 14 models (the 224-free sizes of the test: 64x64, 32x32, 16x16).
"""
import argparse
import time

import torch

from tests.quant.test_capture import MODELS, W8A8_BOUND, settled_model, w8a8_closeness


def row(name: str) -> str:
    t0 = time.time()
    m, x, ref = settled_model(name)
    got = w8a8_closeness(name, m, x, ref)
    return (f"| {name} | {'x'.join(map(str, m.zsq_meta.input_size[1:]))} | {got['floor']:.3f} | "
            f"{got['err']:.3f} | {got['err'] / got['floor']:.2f} | {(format(got['bound'], '.3f') if name in W8A8_BOUND else '(not bounded)')} | {got['top1']:.2f} | "
            f"{got['local_median']:.3f} / {got['local_max']:.3f} | {time.time() - t0:.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=list(MODELS), help="model keys of the test's MODELS")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | input | 1 % noise floor | W8A8 rel. logit error | ratio | logit bound | top-1 agreement | per-quantizer error, median / max | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.only:
        print(row(name), flush=True)


if __name__ == "__main__":
    main()
