"""Paired measurements of the quality levers of issue 15 (keep-the-better reconstruction, Genie-D class
coverage, augmentation during reconstruction) on one model, one bit setting, one seed.

    # one run: synthesize (or reuse) the calibration set, reconstruct with Genie-M, evaluate, keep per-image hits
    python benchmarks/quality_levers.py run --tag w2a4-base --bits w2a4 --set holdout=0 --set keep_better=false
    python benchmarks/quality_levers.py run --tag w2a4-keep --bits w2a4
    # paired comparison on the same images (exact McNemar test on the discordant pairs)
    python benchmarks/quality_levers.py compare w2a4-base w2a4-keep
    # a unit left at round-to-nearest (a diagnostic lever): add --rtn-unit _conv_head to a run
    # per-image hits of an end-to-end run's checkpoint (zsq quantize --out runs/X), to pair it the same way
    python benchmarks/quality_levers.py hits runs/X --tag e2e-X
    # output distillation (zsq.ptq.output_distill) on a saved checkpoint (run --save DIR) and its images
    python benchmarks/quality_levers.py distill runs/X --images SYNTH_TAG --set iters=100 --tag X-kd
    # a checkpoint's predictions against the float model's, on synthetic sets and real images
    python benchmarks/quality_levers.py kl runs/X SYNTH_TAG real:../shared/assets/imagenet/val1300[0:32]
    # each activation quantizer's own error on real images, with its range from each set or from BN statistics
    python benchmarks/quality_levers.py ranges lite0-32 real:../shared/assets/imagenet/val1300[0:32] bn \
        --probe real:../shared/assets/imagenet/val1300[32:64] --model efficientnet_lite0 --bits w4a8
    # a synthetic set alone (no run), another seed's, and the two joined into one set of twice the images
    python benchmarks/quality_levers.py run --tag unused --synth-tag lite0-64-s1 --synth-seed 1 --synth-only --model efficientnet_lite0 --num-images 64
    python benchmarks/quality_levers.py concat lite0-128-s01 lite0-64-s0 lite0-64-s1
    # per-layer BN statistics of synthetic sets against real images
    python benchmarks/quality_levers.py layers lite0-32 real:../shared/assets/imagenet/val1300[0:32] --model efficientnet_lite0
    # accuracy against minutes: one curve per budget knob, reference runs as horizontal lines
    python benchmarks/quality_levers.py curve --dir benchmarks/results/levers --out curves.png \
        --series "Genie-M it/unit=lite0-genie-w4a8-it20,lite0-genie-w4a8-default,lite0-genie-w4a8-it100" \
        --ref lite0-genie-w4a8-real32 --ref lite0-fp32

Each run writes runs/levers/<tag>.json: the command, the digest of the zsq sources, options, top-1, times, `uptime` load before and
after, peak RSS and the per-image hits (1 = correct) that `compare` pairs up. Synthetic sets are cached
in runs/levers/synth-<synth tag> (the same seed and options give the same images).
"""
from __future__ import annotations

import argparse
import logging
import json
import math
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zsq.assets import CIFAR10_EXACT, LITE0, RESNET20, VAL1300, asset  # noqa: E402
from zsq.errors import ZsqError  # noqa: E402

# default weights and evaluation images; Lite0 evaluates on val1300[256:] so that val1300[0:256] can
# serve as the real-data calibration reference (--calib-data .../val1300[0:64])
MODELS = {
    "cifar10_resnet20": (asset(RESNET20), str(asset(CIFAR10_EXACT))),
    "efficientnet_lite0": (asset(LITE0), f"{asset(VAL1300)}[256:]"),
}
OUT = Path("runs/levers")


def _value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _pairs(items):
    return {k: _value(v) for k, v in (s.split("=", 1) for s in items or [])}


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cmd_run(a) -> None:
    import torch

    import zsq
    from zsq.run import load_calibration
    from zsq.methods import get_method
    from zsq.synth import synthesize

    torch.set_num_threads(a.threads)
    weights, eval_data = MODELS.get(a.model, (None, None))
    weights, eval_data = a.weights or weights, a.eval_data or eval_data
    fp = zsq.models.load(a.model, weights=str(weights))
    load0, t0 = _load(), time.time()
    synth_opts = _pairs(a.synth_set)
    compute = zsq.ComputeConfig(precision=a.precision)  # fp32: cpu fp32 NCHW, as before
    if a.method in ("bn-minmax", "fp32"):
        calib, source, synth_s = torch.zeros(0), "none", 0.0
    elif a.calib_data:
        calib, _, source = load_calibration(a.calib_data, fp, a.num_images)
        synth_s = 0.0
    else:
        sdir = OUT / f"synth-{a.synth_tag}"
        ts = time.time()
        seed = a.seed if a.synth_seed is None else a.synth_seed
        sset = synthesize(fp, a.synth, a.num_images, budget="quick", seed=seed, out=sdir, resume=True,
                          compute=compute, **synth_opts)
        synth_s = sset.meta.get("seconds", time.time() - ts)
        calib, source = sset.images, f"synthetic:{a.synth}:{sdir}"
        if a.synth_only:
            print(f"{sdir}: {len(sset)} images, seed {seed}, {synth_s:.0f} s, BNS {sset.meta.get('bns_loss')}")
            return
    tq = time.time()
    if a.method == "fp32":  # the float model itself, for "how far from FP32" on the same images
        model, units = fp, []
    else:
        calibration = zsq.Calibration(images=calib, num_images=a.num_images)
        if not get_method(a.method).needs_images:
            calibration, source, synth_s = zsq.Calibration(num_images=a.num_images), "none", 0.0
        run = zsq.Run(model=zsq.ModelSource(fp), method=zsq.MethodSpec(a.method, _pairs(a.set)),
                      quant=zsq.QuantSpec(a.bits, a.preset), calibration=calibration, compute=compute,
                      budget=zsq.RunBudget(iters=a.iters), seed=a.seed)
        with _round_to_nearest(a.rtn_unit or []):
            res = zsq.execute(run)
        model, units = res.model, res.report["method_report"].get("unit_losses", [])
    quant_s = time.time() - tq
    if a.save and a.method != "fp32":
        from zsq.export.packed_checkpoint import save_quantized

        save_quantized(model, a.save, model_name=a.model, weights_path=str(weights))
    ev, hits = _evaluate_hits(model, eval_data)
    rec = {
        "tag": a.tag, "argv": sys.argv, "zsq_source": zsq.runstate.source_digest(), "model": a.model, "method": a.method, "preset": a.preset, "bits": a.bits, "seed": a.seed, "calib": source,
        "num_images": int(calib.shape[0]) if a.method not in ("bn-minmax", "fp32") else 0, "synth_options": synth_opts, "options": _pairs(a.set), "rtn_units": a.rtn_unit or [],
        "top1": ev["top1"], "n": ev["n"], "synth_seconds": round(synth_s, 1), "quant_seconds": round(quant_s, 1),
        "seconds": round(time.time() - t0, 1), "threads": a.threads, "compute": compute.resolve().describe() if a.precision != "fp32" else "fp32", "load_before": load0, "load_after": _load(),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "reverted_units": [u["unit"] for u in units if u.get("kept") is False],
        "units": [{k: u.get(k) for k in ("unit", "loss_start", "loss_end", "round_loss_end", "soft_loss", "refit_from", "hard_loss",
                                         "holdout_start", "holdout_end", "kept", "hardening")} for u in units],
        "hits": hits,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.tag}.json").write_text(json.dumps(rec))
    print(json.dumps({k: v for k, v in rec.items() if k not in ("hits", "units", "argv")}))


@contextmanager
def _round_to_nearest(names):
    """A diagnostic lever: the named units skip Genie-M's optimisation, so they keep round-to-nearest on
    their starting grid (activation steps at their Lp start); every other unit is reconstructed as usual."""
    from zsq.ptq.reconstruct import Reconstructor

    train, wanted, seen = Reconstructor.train_steps, set(names), set()

    def patched(self, phase, unit, *args, **kwargs):
        if unit.name in wanted:
            seen.add(unit.name)
            return [], 0.0
        return train(self, phase, unit, *args, **kwargs)

    Reconstructor.train_steps = patched
    try:
        yield
    finally:
        Reconstructor.train_steps = train
    if wanted - seen:
        raise SystemExit(f"--rtn-unit: no unit named {sorted(wanted - seen)}")


def _evaluate_hits(model, eval_data: str):
    """evaluate()'s result and the per-image hits (1 = top-1 correct) that `compare` pairs up."""
    from zsq.evaluation import evaluate

    ev = evaluate(model, eval_data, return_preds=True)
    return ev, ev["hits"]


def cmd_hits(a) -> None:
    """Per-image hits of a packed checkpoint (e.g. `zsq quantize --out DIR`'s), so that end-to-end runs can be
    paired with `compare`: writes runs/levers/<tag>.json with the run's report (the manifest's info) beside them."""
    import torch

    from zsq.export.manifest import read_manifest
    from zsq.export.packed_checkpoint import load_quantized

    torch.set_num_threads(a.threads)
    folder = Path(a.checkpoint)
    try:
        model = load_quantized(folder)
    except ZsqError as e:
        raise SystemExit(f"hits: {e}") from None
    name = model.zsq_meta.name
    if not a.eval_data and name not in MODELS:
        raise SystemExit(f"hits: {name} has no default evaluation images here; give --eval-data PATH[a:b]")
    eval_data = a.eval_data or MODELS[name][1]
    ev, hits = _evaluate_hits(model, eval_data)
    manifest = read_manifest(folder, verify=False)  # load_quantized has checked the files
    rec = {"tag": a.tag, "argv": sys.argv, "checkpoint": str(folder), "model": name, "eval_data": eval_data,
           "top1": ev["top1"], "n": ev["n"], "hits": hits,
           "report": manifest.get("info")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.tag}.json").write_text(json.dumps(rec))
    print(json.dumps({k: rec[k] for k in ("tag", "checkpoint", "top1", "n")}))


def cmd_row(a) -> None:
    """A `zsq bench` cell's row (CELL/row.json) as runs/levers/<tag>.json, so that suite cells pair with lever
    runs in `compare`: its main set's per-image hits, top-1, times, threads, peak memory and unit losses."""
    path = Path(a.cell) / "row.json"
    if not path.is_file():
        raise SystemExit(f"row: {path} does not exist (a finished cell's folder, e.g. runs/bench/cells/003)")
    row = json.loads(path.read_text())
    main = row.get("main") or {}
    if not main.get("hits"):
        raise SystemExit(f"row: {path} has no per-image hits on its main set")
    rec = {"tag": a.tag, "source": f"{path} ({row['key']})", "top1": main["top1"], "n": main["n"],
           "threads": row.get("threads"), "synth_seconds": row.get("synth_seconds"),
           "quant_seconds": row.get("quant_seconds"), "peak_rss_mib": row.get("peak_rss_mib"),
           "units": row.get("unit_losses", []), "hits": [int(c) for c in main["hits"]]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.tag}.json").write_text(json.dumps(rec))
    print(json.dumps({k: rec[k] for k in ("tag", "source", "top1", "n")}))


def _float_model(name: str, what: str):
    """The float model of a checkpoint's model (a checkpoint holds only the rounded weights)."""
    import zsq

    if name not in MODELS:
        raise SystemExit(f"{what}: no float weights known for {name} here (known: {sorted(MODELS)})")
    return zsq.models.load(name, weights=str(MODELS[name][0]))


def cmd_distill(a) -> None:
    """Output distillation (zsq.ptq.output_distill) on a packed checkpoint, with the images it was
    reconstructed on; writes runs/levers/<tag>.json with the per-image hits, so `compare` pairs it with
    the checkpoint's own hits."""
    import torch

    import zsq
    from zsq.export.packed_checkpoint import load_quantized
    from zsq.options import parse_options
    from zsq.ptq.output_distill import OutputDistillConfig, distill_outputs

    torch.set_num_threads(a.threads)
    opts = _pairs(a.set)
    try:
        cfg = parse_options(OutputDistillConfig, opts, "distill")
    except ZsqError as e:
        raise SystemExit(str(e)) from None
    model = load_quantized(Path(a.checkpoint))
    name = model.zsq_meta.name
    fp = _float_model(name, "distill")
    images = _images(name, a.images)
    t0 = time.time()
    rep = distill_outputs(model, fp, images, cfg, seed=a.seed)
    secs = time.time() - t0
    eval_data = a.eval_data or MODELS[model.zsq_meta.name][1]
    ev, hits = _evaluate_hits(model, eval_data)
    rec = {"tag": a.tag, "argv": sys.argv, "zsq_source": zsq.runstate.source_digest(),
           "checkpoint": a.checkpoint, "images": a.images, "num_images": int(images.shape[0]),
           "options": opts, "distill": rep, "distill_seconds": round(secs, 1), "threads": a.threads,
           "load_after": _load(), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "top1": ev["top1"], "n": ev["n"], "hits": hits}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.tag}.json").write_text(json.dumps(rec))
    print(json.dumps({k: v for k, v in rec.items() if k not in ("hits", "argv")}))


def cmd_kl(a) -> None:
    """How far a packed checkpoint's predictions are from its float model's on image sets: mean KL(float ||
    quantized), top-1 agreement, and the float model's mean max probability and entropy (nats)."""
    import torch
    import torch.nn.functional as F

    from zsq.export.packed_checkpoint import load_quantized

    torch.set_num_threads(a.threads)
    model = load_quantized(Path(a.checkpoint))
    name = model.zsq_meta.name
    fp = _float_model(name, "kl")
    for spec in a.sets:
        x = _images(name, spec)
        with torch.no_grad():
            q = torch.cat([model(c) for c in x.split(32)])
            f = torch.cat([fp(c) for c in x.split(32)])
        t, s = F.log_softmax(f, 1), F.log_softmax(q, 1)
        kl = (t.exp() * (t - s)).sum(1)
        print(f"{spec}: {len(x)} images, KL mean {float(kl.mean()):.4f} median {float(kl.median()):.4f}, "
              f"top-1 agreement {float((q.argmax(1) == f.argmax(1)).float().mean()):.3f}, float model: "
              f"mean max prob {float(t.exp().max(1).values.mean()):.3f}, entropy {float(-(t.exp() * t).sum(1).mean()):.2f}")


def mcnemar(a, b):
    """(only a right, only b right, exact two-sided p) for paired 0/1 hits (zsq.evaluation.mcnemar)."""
    from zsq.evaluation import mcnemar as paired

    try:
        return paired(a, b)
    except ZsqError as e:
        raise SystemExit(str(e)) from None


def load_run(folder, tag: str) -> dict:
    """The JSON of run `tag` in `folder`; a one-line exit when there is none."""
    path = Path(folder) / f"{tag}.json"
    if not path.is_file():
        raise SystemExit(f"no run {tag!r}: {path} does not exist")
    return json.loads(path.read_text())


def cmd_compare(a) -> None:
    base = load_run(a.dir, a.base)
    for tag in a.others:
        other = load_run(a.dir, tag)
        n10, n01, p = mcnemar(base["hits"], other["hits"])
        print(f"{a.base} {base['top1']:.2f} vs {tag} {other['top1']:.2f}: only base right {n10}, "
              f"only {tag} right {n01}, McNemar exact p = {p:.3g}")


def cmd_coverage(a) -> None:
    """Class coverage of cached synthetic sets: the teacher's predicted-class entropy (bits), distinct
    classes, mean max-softmax and, where the set has assigned labels, the share predicted as assigned."""
    import torch

    import zsq
    from zsq.synth.dataset import SyntheticSet

    torch.set_num_threads(a.threads)
    fp = zsq.models.load(a.model, weights=str(MODELS[a.model][0]))
    for tag in a.tags:
        sset = SyntheticSet.load(OUT / f"synth-{tag}")
        with torch.no_grad():
            p = torch.cat([torch.softmax(fp(x), 1) for x in sset.images.split(32)])
        pred = p.argmax(1)
        q = torch.bincount(pred, minlength=p.shape[1]).float() / len(pred)
        ent = float(-(q[q > 0] * q[q > 0].log2()).sum())
        labels = getattr(sset, "labels", None)
        hit = f", predicted as assigned {float((pred == labels).float().mean()):.0%}" if labels is not None else ""
        print(f"synth-{tag}: {len(pred)} images, entropy {ent:.2f} of {math.log2(len(pred)):.2f} bits, "
              f"{int((q > 0).sum())} classes, mean max prob {float(p.max(1).values.mean()):.3f}{hit}, "
              f"BNS {sset.meta.get('bns_loss', float('nan')):.3f}, {sset.meta.get('seconds', 0):.0f} s")


def _images(model: str, spec: str):
    """Images of a synthetic-set tag, or of real data written as real:PATH[a:b]."""
    import zsq
    from zsq.data import load_images_tensor
    from zsq.synth.dataset import SyntheticSet

    if spec.startswith("real:"):
        fp = zsq.models.load(model, weights=str(MODELS[model][0]))
        return load_images_tensor(spec[5:], zsq.models.get_meta(fp))[0]
    return SyntheticSet.load(OUT / f"synth-{spec}").images


def _photo_range(x, meta) -> str:
    """Where the pixels lie in [0, 1] (before the model's normalisation): their range, the share within 0.01
    of their channel's extremes (a saturated generator piles pixels there) and the share in each fifth."""
    import torch

    p = x * torch.tensor(meta.std).view(1, -1, 1, 1) + torch.tensor(meta.mean).view(1, -1, 1, 1)
    lo, hi = p.amin(dim=(0, 2, 3), keepdim=True), p.amax(dim=(0, 2, 3), keepdim=True)
    at_limits = float((((p - lo) < 0.01) | ((hi - p) < 0.01)).float().mean())
    fifths = (torch.histc(p, bins=5, min=0, max=1) / p.numel()).tolist()
    return (f"pixels in [0, 1]: {float(p.min()):.2f}-{float(p.max()):.2f}, {at_limits:.0%} at their channel's "
            f"extremes, per fifth {[round(f, 2) for f in fifths]}")


def _act_errors(qmodel, probe):
    """Each activation quantizer's own relative squared error and clipped share on ``probe``: every
    quantizer sees its float input (the others off), so the numbers are its range's alone."""
    import torch

    from zsq.hooks import Hooks
    from zsq.quant.quantizer import fake_quantize
    from zsq.quant.state import quantizers_disabled
    from zsq.quant.inventory import act_quantizers

    out = {}

    def pre(name, q):
        def h(_m, inp):
            x = inp[0].detach()
            scale, zp = q.qparams(x)
            lo, hi = (q.qmin - zp) * scale, (q.qmax - zp) * scale
            xq = fake_quantize(x, scale, zp, q.qmin, q.qmax)  # the model's own grid arithmetic
            err = float(((xq - x) ** 2).sum() / (x ** 2).sum().clamp_min(1e-12))
            out[name] = (float(hi.max()), err, float(((x < lo) | (x > hi)).float().mean()))
        return h

    quants = act_quantizers(qmodel)
    with Hooks() as hooks, quantizers_disabled(qmodel), torch.no_grad():
        for name, q in quants:
            hooks.pre(q, pre(name, q))
        qmodel.eval()
        qmodel(probe)
    return [(name,) + out[name] for name, _ in quants if name in out]


def cmd_ranges(a) -> None:
    """Where activation ranges set on synthetic images cost real images: each activation quantizer's range
    (its upper clip), its own relative squared error and the share of values it clips on real probe
    images, with the range from each image set (the preset's observer) or from BatchNorm statistics (bn)."""
    import copy

    import torch

    import zsq
    from zsq.quant import get_preset, quantize_model
    from zsq.quant.calibration import calibrate, calibrate_from_bn

    torch.set_num_threads(a.threads)
    fp = zsq.models.load(a.model, weights=str(MODELS[a.model][0]))
    base = quantize_model(fp, get_preset(a.preset, a.bits))
    probe = _images(a.model, a.probe)
    rows = {}
    for spec in a.sets:
        q = copy.deepcopy(base)
        calibrate_from_bn(q, seed=a.seed) if spec == "bn" else calibrate(q, _images(a.model, spec), seed=a.seed)
        rows[spec] = _act_errors(q, probe)
    print(f"probe {a.probe} ({len(probe)} images); per quantizer: upper clip / relative squared error / clipped share")
    print(f"{'quantizer':40s}" + "".join(f"{s[-26:]:>30}" for s in a.sets))
    names = [r[0] for r in rows[a.sets[0]]]
    for i, name in enumerate(names):
        print(f"{name[-40:]:40s}" + "".join(f"{rows[s][i][1]:9.3f} {rows[s][i][2]:9.2e} {rows[s][i][3]:9.1e}" + " " for s in a.sets))
    for s in a.sets:
        errs = [r[2] for r in rows[s]]
        print(f"{s}: mean relative error {sum(errs) / len(errs):.3e}, worst {max(errs):.3e}, "
              f"mean clipped share {sum(r[3] for r in rows[s]) / len(errs):.2e}")


def cmd_concat(a) -> None:
    """One synthetic set of several (runs/levers/synth-TAG each), in order: more images from independent
    seeds without synthesizing the ones already made again."""
    import torch

    from zsq.synth.dataset import SyntheticSet

    out = OUT / f"synth-{a.out}"
    if out.exists():
        raise SystemExit(f"{out} exists; pick another tag")
    sets = [SyntheticSet.load(OUT / f"synth-{t}") for t in a.tags]
    shapes = {tuple(s.images.shape[1:]) for s in sets}
    if len(shapes) > 1:
        raise SystemExit(f"the sets' images differ in shape: {sorted(shapes)}")
    meta = dict(sets[0].meta, concat_of=list(a.tags), seeds=[s.meta.get("seed") for s in sets],
                seconds=sum(s.meta.get("seconds", 0.0) for s in sets))
    labels = None if any(s.labels is None for s in sets) else torch.cat([s.labels for s in sets])
    SyntheticSet(torch.cat([s.images for s in sets]), labels, meta).save(out)
    print(f"{out}: {sum(len(s) for s in sets)} images from {', '.join(a.tags)}")


def cmd_layers(a) -> None:
    """Per-layer Genie BNS (batches of --batch) and per-channel pixel mean/std of image sets side by side:
    where synthetic images' statistics differ from real ones'."""
    import torch

    import zsq
    from zsq.synth.bn_stats import BNStatsRecorder

    torch.set_num_threads(a.threads)
    fp = zsq.models.load(a.model, weights=str(MODELS[a.model][0]))
    columns = []
    for spec in a.sets:
        x = _images(a.model, spec)[:a.batch]
        with BNStatsRecorder(fp) as rec, torch.no_grad():
            fp(x)
            columns.append(rec.per_layer_genie())
        std, mean = torch.std_mean(x, dim=(0, 2, 3))
        print(f"{spec}: {len(x)} images, BNS/layer {sum(columns[-1]) / len(columns[-1]):.3f}, pixel mean "
              f"{[round(v, 3) for v in mean.tolist()]}, std {[round(v, 3) for v in std.tolist()]}, "
              + _photo_range(x, zsq.models.get_meta(fp)))
    print("BN layer  " + "  ".join(f"{s[-14:]:>14}" for s in a.sets))
    for i, row in enumerate(zip(*columns)):
        print(f"{i:8d}  " + "  ".join(f"{v:14.3f}" for v in row))


def cmd_curve(a) -> None:
    """Top-1 against minutes for runs that differ in one budget knob: each --series is a curve whose x is
    the time of the stage that changed (synthesis seconds if they differ between the series' runs,
    reconstruction seconds otherwise); each --ref is a horizontal line (real images, FP32)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for spec in a.series:
        label, _, tags = spec.rpartition("=")
        runs = [load_run(a.dir, t) for t in tags.split(",")]
        synth_varies = len({r["calib"] for r in runs}) > 1  # different synthetic sets: synthesis changed
        series.append((label or tags, "synthesis" if synth_varies else "reconstruction", runs))
    stages = [st for st in ("synthesis", "reconstruction") if any(s[1] == st for s in series)]
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4.5), squeeze=False, sharey=True)
    ax_of = dict(zip(stages, axes[0]))
    for i, (label, stage, runs) in enumerate(series):
        key = "synth_seconds" if stage == "synthesis" else "quant_seconds"
        pts = [(r[key] / 60, r["top1"], r["tag"]) for r in runs]
        ax = ax_of[stage]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=label)
        for x, y, _ in pts:
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        print(f"{label} ({stage}): " + ", ".join(f"{t} {y:.2f} % at {x:.1f} min" for x, y, t in pts))
    for stage, ax in ax_of.items():
        for j, tag in enumerate(a.ref or []):
            r = load_run(a.dir, tag)
            ax.axhline(r["top1"], color=f"C{len(series) + j}", linestyle="--", label=f"{tag} {r['top1']:.2f} %")
        ax.set_xlabel(f"{stage} minutes (wall time as each run recorded it)")
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("top-1 % (same evaluation images)")
    fig.suptitle(a.title or "accuracy against minutes")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tag", required=True)
    r.add_argument("--model", default="cifar10_resnet20", choices=sorted(MODELS))
    r.add_argument("--method", default="genie", choices=["genie", "bn-minmax", "fp32"])
    r.add_argument("--weights")
    r.add_argument("--eval-data")
    r.add_argument("--bits", default="w2a4")
    r.add_argument("--preset", help="quantization preset (default: the method's, e.g. genie)")
    r.add_argument("--num-images", type=int, default=256)
    r.add_argument("--iters", type=int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--calib-data", help="real images instead of Genie-D (PATH[a:b])")
    r.add_argument("--synth-tag", default="base", help="cache name of the synthetic set (change with --synth-set)")
    r.add_argument("--synth", default="genie", help="synthesizer of the calibration set (zsq.synth; default genie)")
    r.add_argument("--synth-set", action="append", metavar="KEY=VALUE", help="synthesizer option")
    r.add_argument("--synth-seed", type=int, help="seed of the synthetic set (default: --seed)")
    r.add_argument("--synth-only", action="store_true", help="make (or reuse) the synthetic set, then stop")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="reconstruction option (job.extra)")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="synthesis and reconstruction compute (zsq.compute; bf16 uses channels_last)")
    r.add_argument("--verbose", action="store_true")
    r.add_argument("--rtn-unit", action="append", metavar="UNIT",
                   help="leave this unit at round-to-nearest (no reconstruction; e.g. _conv_head); repeatable")
    r.add_argument("--save", help="also save the quantized model here (a packed checkpoint folder)")
    r.set_defaults(func=cmd_run)
    h = sub.add_parser("hits", help="per-image hits of a packed checkpoint (zsq quantize --out), for compare")
    h.add_argument("checkpoint")
    h.add_argument("--tag", required=True)
    h.add_argument("--eval-data", help="default: the model's evaluation images above")
    h.add_argument("--threads", type=int, default=1)
    h.set_defaults(func=cmd_hits)
    rw = sub.add_parser("row", help="a zsq bench cell's row (CELL/row.json) as a run JSON, for compare")
    rw.add_argument("cell")
    rw.add_argument("--tag", required=True)
    rw.set_defaults(func=cmd_row)
    d = sub.add_parser("distill", help="output distillation on a packed checkpoint, then its per-image hits")
    d.add_argument("checkpoint")
    d.add_argument("--images", required=True, help="synthetic-set tag (runs/levers/synth-TAG) or real:PATH[a:b]")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="OutputDistillConfig field")
    d.add_argument("--tag", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--eval-data")
    d.add_argument("--threads", type=int, default=1)
    d.set_defaults(func=cmd_distill)
    kk = sub.add_parser("kl", help="a packed checkpoint's predictions against its float model's, per image set")
    kk.add_argument("checkpoint")
    kk.add_argument("sets", nargs="+", help="synthetic-set tags (runs/levers/synth-TAG) or real:PATH[a:b]")
    kk.add_argument("--threads", type=int, default=1)
    kk.set_defaults(func=cmd_kl)
    c = sub.add_parser("compare")
    c.add_argument("base")
    c.add_argument("others", nargs="+")
    c.add_argument("--dir", default=str(OUT), help="where the runs' JSONs are (default runs/levers)")
    c.set_defaults(func=cmd_compare)
    k = sub.add_parser("curve", help="plot top-1 against minutes for runs that differ in one budget knob")
    k.add_argument("--series", action="append", required=True, metavar="LABEL=TAG,TAG,...")
    k.add_argument("--ref", action="append", metavar="TAG", help="a run drawn as a horizontal line")
    k.add_argument("--dir", default=str(OUT), help="where the runs' JSONs are (default runs/levers)")
    k.add_argument("--title")
    k.add_argument("--out", required=True, help="the PNG to write")
    k.set_defaults(func=cmd_curve)
    y = sub.add_parser("layers", help="per-layer BNS and pixel statistics of synthetic sets and real images")
    y.add_argument("sets", nargs="+", help="synthetic-set tags (runs/levers/synth-TAG) or real:PATH[a:b]")
    y.add_argument("--model", default="cifar10_resnet20", choices=sorted(MODELS))
    y.add_argument("--batch", type=int, default=32, help="images per set fed as one batch (default 32)")
    y.add_argument("--threads", type=int, default=1)
    y.set_defaults(func=cmd_layers)
    g = sub.add_parser("ranges", help="each activation quantizer's error on real images, per calibration set or bn")
    g.add_argument("sets", nargs="+", help="synthetic-set tags, real:PATH[a:b], or bn (BatchNorm statistics)")
    g.add_argument("--probe", required=True, help="the images the errors are measured on (real:PATH[a:b])")
    g.add_argument("--model", default="cifar10_resnet20", choices=sorted(MODELS))
    g.add_argument("--bits", default="w4a8")
    g.add_argument("--preset", default="genie")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1)
    g.set_defaults(func=cmd_ranges)
    cc = sub.add_parser("concat")
    cc.add_argument("out", help="tag of the new set (runs/levers/synth-OUT)")
    cc.add_argument("tags", nargs="+", help="synthetic-set tags to join, in order")
    cc.set_defaults(func=cmd_concat)
    v = sub.add_parser("coverage")
    v.add_argument("tags", nargs="+", help="synthetic-set tags (runs/levers/synth-TAG)")
    v.add_argument("--model", default="cifar10_resnet20", choices=sorted(MODELS))
    v.add_argument("--threads", type=int, default=1)
    v.set_defaults(func=cmd_coverage)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO if getattr(a, "verbose", False) else logging.WARNING,
                        format="[zsq] %(message)s")
    logging.getLogger("zsq").setLevel(logging.INFO if getattr(a, "verbose", False) else logging.WARNING)
    a.func(a)


if __name__ == "__main__":
    main()
