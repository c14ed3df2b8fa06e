"""Issue 13 evidence: graph capture on zsq's own teachers and on an independently written Lite0.

    PYTHONPATH=$PWD python benchmarks/any_cnn.py --threads 1 --eval indep_lite0
    PYTHONPATH=$PWD python benchmarks/any_cnn.py --threads 1 --eval efficientnet_lite0

1. ResNet-20 (exact-1017) and EfficientNet-Lite0 (val1300) through ``zsq.quantize(name, ...)`` with
   bn-minmax at W8A8 (+ W4A8 for Lite0): the plan (layers, residual/activation quantizers, units) and
   the accuracy, to compare with the numbers recorded before graph capture.
2. ``IndepLite0``: EfficientNet-Lite0 written here, independently of zsq's model registry, the way
   efficientnet_pytorch writes it: ``Conv2dStaticSamePadding`` (a Conv2d subclass that pads in its own
   forward), functional ReLU6, ``x = x + inputs`` residuals, block class ``IndepMBConv`` (in no
   registry). It loads the shared checkpoint and goes through ``zsq.quantize(module, meta=...)``.
   The Genie-M reconstruction units found on it are printed (a full Genie-M run is too slow here).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import zsq
from zsq.assets import asset as asset_path
from zsq.models.efficientnet_lite import LITE0_META, LITE0_STAGES
from zsq.models.meta import ModelMeta
from zsq.ptq.units import find_units, summarize_units
from zsq.quant import get_preset, quantize_model


class Conv2dStaticSamePadding(nn.Conv2d):
    """TF "SAME" padding fixed from the image size at construction (efficientnet_pytorch's idea)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, image_size=224):
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=bias)
        pad = max((math.ceil(image_size / stride) - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class IndepMBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand, image_size):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = Conv2dStaticSamePadding(cin, mid, 1, image_size=image_size)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = Conv2dStaticSamePadding(mid, mid, k, stride, groups=mid, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = Conv2dStaticSamePadding(mid, cout, 1, image_size=math.ceil(image_size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs):
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.skip:
            x = x + inputs
        return x


class IndepLite0(nn.Module):
    def __init__(self, image_size=224):
        super().__init__()
        self._conv_stem = Conv2dStaticSamePadding(3, 32, 3, 2, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        size = math.ceil(image_size / 2)
        blocks = []
        for repeats, k, s, e, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                stride = s if i == 0 else 1
                blocks.append(IndepMBConv(cin if i == 0 else cout, cout, k, stride, e, size))
                size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dStaticSamePadding(320, 1280, 1, image_size=size)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def plan_summary(qmodel) -> dict:
    p = qmodel.zsq_quant_plan
    units = find_units(qmodel, "block")
    return {"layers": len(p["layers"]), "layer_bits": [(r["layer"], r["w_bits"], r["a_bits"]) for r in p["layers"]],
            "residual": p["residual"], "after_activation": len(p["after_activation"]),
            "shared": len(p["shared_input_quantizers"]), "eager_fallback": p["eager_fallback"],
            "kept_float": p["kept_float"], "units": summarize_units(units),
            "unit_names": [u.name for u in units if u.kind == "block"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-eval", action="store_true", help="plans and units only")
    ap.add_argument("--eval", choices=("efficientnet_lite0", "indep_lite0"), default="indep_lite0",
                    help="which Lite0 to quantize (bn-minmax W8A8, W4A8) and evaluate on val1300")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lite_w = asset_path("imagenet/efficientnet-lite0-57934424.pth")
    val = str(asset_path("imagenet/val1300"))
    c10 = str(asset_path("cifar10/cifar10_test_lossless_first1017.npz"))
    r20_w = str(asset_path("cifar10/resnet20-12fca82f.th"))

    indep = IndepLite0().eval()
    state = torch.load(lite_w, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    print("indep load_state_dict:", indep.load_state_dict(state, strict=True), flush=True)
    meta = ModelMeta("indep_lite0", 1000, (3, 224, 224), LITE0_META.mean, LITE0_META.std,
                     resize=LITE0_META.resize, interpolation=LITE0_META.interpolation, dataset="imagenet")
    zsq.models.set_meta(indep, meta)
    ref = zsq.models.load("efficientnet_lite0", weights=str(lite_w))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        print("indep vs efficientnet_lite0 float logits max |diff|:", (indep(x) - ref(x)).abs().max().item(), flush=True)

    plans = (("cifar10_resnet20", zsq.models.load("cifar10_resnet20", weights=r20_w)),
             ("efficientnet_lite0", ref), ("indep_lite0", indep))
    for label, m in plans if args.eval == "indep_lite0" else ():
        for preset in ("genie", "gdfq"):
            q = quantize_model(m, get_preset(preset, "w4a8"), example_input=x[:, :, :m.zsq_meta.input_size[1],
                                                                                 :m.zsq_meta.input_size[2]])
            s = plan_summary(q)
            print(json.dumps({"plan": label, "preset": preset, **{k: v for k, v in s.items() if k != "layer_bits"},
                              "layer_bits": " ".join(f"W{w}A{a or '-'}" for _, w, a in s["layer_bits"])}),
                  flush=True)
    if args.skip_eval:
        return
    if args.eval == "indep_lite0":
        r = zsq.quantize("cifar10_resnet20", weights=r20_w, method="bn-minmax", bits="w8a8", eval_data=c10)
        print(json.dumps({"model": "cifar10_resnet20", "bits": "w8a8", "fp32_top1": r.report["fp32_top1"],
                          "quant_top1": r.report["quant_top1"], "n": r.report["n"]}), flush=True)
    from zsq.data import load_images_tensor

    t0 = time.time()
    images = load_images_tensor(val, meta)  # the same preprocessing as efficientnet_lite0's meta
    print(f"val1300 decoded in {time.time() - t0:.0f}s", flush=True)
    with torch.no_grad():
        print("indep vs efficientnet_lite0 float logits on 32 val1300 images max |diff|:",
              (indep(images[0][:32]) - ref(images[0][:32])).abs().max().item(), flush=True)
    model, kw = (("efficientnet_lite0", {"weights": str(lite_w)}) if args.eval == "efficientnet_lite0"
                 else (indep, {"meta": meta}))
    for bits in ("w8a8", "w4a8"):
        t0 = time.time()
        res = zsq.quantize(model, method="bn-minmax", bits=bits, **kw)
        ev = zsq.evaluate(res.model, images, return_preds=True)
        print(json.dumps({"model": args.eval, "bits": bits, "quant_top1": ev["top1"], "n": ev["n"],
                          "capture": res.report["capture"], "seconds": round(time.time() - t0, 1),
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                          "preds_sha": hashlib.sha256(torch.as_tensor(ev["preds"]).numpy().tobytes()).hexdigest()[:16]}),
              flush=True)


if __name__ == "__main__":
    main()
