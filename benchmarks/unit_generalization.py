"""Does one Genie-M unit trained on synthetic images generalise to real ones? (issue 15 diagnostic)

Every other unit stays float (weights and activations unquantized), so the unit reads the FP model's own
input and its error is its own. For each variant the unit is reconstructed once on the training images and
its hardened output error is measured on held-out real images (and, with --syn-holdout, on synthetic images
it did not train on):

    PYTHONPATH=. python benchmarks/unit_generalization.py --units _blocks.8,_conv_head \\
        --synth-dir runs/levers/synth-lite0-32-q-pp-m2 --variant rtn:iters=0 --variant base: --variant real:data=real

A variant is NAME:key=value;key=value with keys iters, data (synth | real: the first half of --real),
round_weight, beta_end and the PTQOptions of --set (lr_v, ...). iters=0 takes no step: round-to-nearest on the
starting grid (activation steps at their Lp start). One JSON line per (variant, unit).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _recipe(spec: dict):
    from zsq.errors import ZsqError
    from zsq.ptq.budgets import RECIPES, get_budget
    from zsq.ptq.reconstruction_methods import PTQOptions, with_overrides

    known = {"iters", "round_weight", "beta_end"} | {f.name for f in dataclasses.fields(PTQOptions)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise SystemExit(f"--variant: unknown key(s) {unknown}; use iters, data, round_weight, beta_end or an option "
                         "of PTQOptions (e.g. lr_v)")
    try:
        rw, be = float(spec.pop("round_weight", 1.0)), float(spec.pop("beta_end", 2.0))
        budget = get_budget("quick", (3, 224, 224)).override(int(spec.pop("iters", 50)))
        user = PTQOptions(**{k: float(v) for k, v in spec.items()})
    except (ValueError, ZsqError) as e:
        raise SystemExit(f"--variant: {e}") from None
    rec = with_overrides(RECIPES["genie"], user, 4, budget.iters)
    phases = tuple(dataclasses.replace(p, round_weight=rw) for p in rec.phases)
    return dataclasses.replace(rec, beta_end=be, phases=phases), budget


def _unit_error(eng, name: str, images):
    """The unit's hardened output error on ``images``, its input taken from the float model."""
    from zsq.ptq import cache
    from zsq.ptq.reconstruct import output_error

    _, y = cache.capture(eng.fp_ref, name, images, 64, want_output=True, compute=eng.compute)
    xq, _ = cache.capture(eng.qmodel, name, images, 64, want_output=False, compute=eng.compute)
    mod = eng.qmodel.get_submodule(name)
    return output_error(mod, xq, y)


def _one(fp, qc, images, variant: dict, name: str):
    from zsq.ptq.budgets import EngineOptions
    from zsq.ptq.reconstruct import Reconstructor
    from zsq.quant.state import set_flags, set_quant_state
    from zsq.quant.transforms import quantize_model

    variant = dict(variant)
    rtn = variant.get("iters") == "0"
    if rtn:
        variant["iters"] = "1"  # a budget needs a step; none is taken below
    recipe, budget = _recipe(variant)
    eng = Reconstructor(quantize_model(fp, qc), images, recipe, budget, EngineOptions())
    if rtn:  # no optimisation: the soft bits harden where they start, round-to-nearest on the starting grid
        eng.train_steps = lambda *args, **kwargs: ([], 0.0)
    names = [u.name for u in eng.units]
    if name not in names:
        raise SystemExit(f"no unit {name!r}; the units are {', '.join(names)}")
    ui = names.index(name)
    set_quant_state(eng.qmodel, weights=False, acts=False)
    set_quant_state(eng.qmodel.get_submodule(name), weights=True, acts=False)  # acts: only_this_unit

    def only_this_unit(phase, upto):  # the engine would switch on every earlier unit's activations
        set_flags(eng.all_acts, enabled=False, observing=False)
        set_flags(eng.unit_acts[ui], enabled=True)

    eng.set_acts = only_this_unit
    return eng, eng.run_unit(0, ui)


def main() -> None:
    import torch

    import zsq
    from zsq.run import load_calibration
    from zsq.assets import LITE0, VAL1300, asset
    from zsq.errors import ZsqError
    from zsq.quant import get_preset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", required=True, help="comma-separated unit names (e.g. _blocks.8,_conv_head)")
    p.add_argument("--synth-dir", required=True, help="a synthetic set (zsq synthesize --out, or quality_levers' cache)")
    p.add_argument("--real", default=f"{asset(VAL1300)}[0:64]", help="real images: first half trains data=real, "
                   "second half is the held-out evaluation")
    p.add_argument("--syn-holdout", type=int, default=0, help="also train on all but the last N synthetic images "
                   "and report the error on those N")
    p.add_argument("--variant", action="append", required=True, metavar="NAME:k=v;k=v")
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    try:
        fp = zsq.models.load("efficientnet_lite0", weights=str(asset(LITE0)))
        syn, _, _ = load_calibration(a.synth_dir, fp)
        real, _, _ = load_calibration(a.real, fp)
    except ZsqError as e:
        raise SystemExit(f"unit_generalization: {e}")
    if not 0 <= a.syn_holdout < syn.shape[0]:
        raise SystemExit(f"--syn-holdout must be from 0 to {syn.shape[0] - 1} (the set has {syn.shape[0]} images)")
    half = real.shape[0] // 2
    qc = get_preset("genie", a.bits)
    for v in a.variant:
        label, _, spec = v.partition(":")
        pairs = [x for x in spec.split(";") if x]
        if any("=" not in x for x in pairs):
            raise SystemExit(f"--variant {v!r}: write NAME:key=value;key=value")
        kv = dict(x.split("=", 1) for x in pairs)
        data = kv.pop("data", "synth")
        train = real[:half] if data == "real" else syn[:syn.shape[0] - a.syn_holdout]
        for name in a.units.split(","):
            torch.manual_seed(0)
            t = time.time()
            eng, r = _one(fp, qc, train, kv, name)
            row = {"variant": label, "unit": name, "data": data, "train_images": int(train.shape[0]),
                   "lr_v": eng.recipe.phases[0].lr_v, "loss_end": r["loss_end"], "hard_train": r["hard_loss"],
                   "hard_real_heldout": _unit_error(eng, name, real[half:]), "seconds": round(time.time() - t, 1)}
            if a.syn_holdout:
                row["hard_synth_heldout"] = _unit_error(eng, name, syn[syn.shape[0] - a.syn_holdout:])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
