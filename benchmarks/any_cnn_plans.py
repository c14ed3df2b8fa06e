"""Issue 13 evidence that needs no data: run it once on main and once on this tree and compare.

    PYTHONPATH=<tree> python benchmarks/any_cnn_plans.py dump OUT.json      # zsq's own models: the plan
    PYTHONPATH=<tree> python benchmarks/any_cnn_plans.py before-after       # models zsq did not define

``dump`` writes, for cifar10_resnet20 and efficientnet_lite0 under genie and gdfq (W4A4), every layer's
bits, the residual/after-activation quantizers, shared input quantizers, activation quantizer names,
state_dict keys and reconstruction units (``cmp`` the two files). ``before-after`` counts residual
quantizers, the final conv map size and quantizers that read more than one tensor on torchvision/timm
models (random init, 224²).
"""
import dataclasses
import json
import sys

import torch

import zsq.models
from zsq.models.meta import ModelMeta, set_meta
from zsq.ptq.units import find_units
from zsq.quant import act_quantizers, get_preset, quant_layers, quantize_model


def dump(path):
    out = {}
    for name in ("cifar10_resnet20", "efficientnet_lite0"):
        m = zsq.models.load(name)
        for preset in ("genie", "gdfq"):
            q = quantize_model(m, get_preset(preset, "w4a4"))
            p = q.zsq_quant_plan
            out[f"{name}/{preset}"] = {
                "layers": p["layers"], "after_activation": p["after_activation"], "residual": p["residual"],
                "shared": p["shared_input_quantizers"], "act_quantizers": [n for n, _ in act_quantizers(q)],
                "state_keys": list(q.state_dict().keys()), "units": [u.describe() for u in find_units(q, "block")]}
    json.dump(out, open(path, "w"), indent=0)


def cheap(c):
    return dataclasses.replace(c, weight=dataclasses.replace(c.weight, observer="minmax"))


def before_after():
    import timm
    import torchvision

    for name, m in [("torchvision:resnet18", torchvision.models.resnet18()), ("torchvision:mobilenet_v2", torchvision.models.mobilenet_v2()),
                    ("timm:tf_efficientnet_lite0", timm.create_model("tf_efficientnet_lite0"))]:
        m.eval(); set_meta(m, ModelMeta("m", 1000, (3, 224, 224), (0.5,)*3, (0.5,)*3))
        x = torch.randn(1, 3, 224, 224)
        try:
            g = quantize_model(m, cheap(get_preset("genie", "w8a8")))
            res = len(g.zsq_quant_plan["residual"])
            feats = {}
            last_conv = [n for n, _ in quant_layers(g) if "conv" in n][-1]
            h = g.get_submodule(last_conv).register_forward_hook(lambda mod, i, o: feats.__setitem__("s", tuple(o.shape[-2:])))
            with torch.no_grad(): g(x)
            h.remove()
            fm = feats["s"]
        except Exception as e:
            res, fm = f"error: {str(e)[:150]}", "-"
        d = quantize_model(m, cheap(get_preset("gdfq", "w8a8")))
        calls = {}
        hs = [q.register_forward_pre_hook(lambda mod, a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1)) for n, q in act_quantizers(d)]
        with torch.no_grad(): d(x)
        print(f"{name}: genie residual quantizers {res}; last conv map {fm}; gdfq act quantizers {len(act_quantizers(d))}, reading >1 tensor: {sum(v > 1 for v in calls.values())}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    dump(sys.argv[2]) if sys.argv[1] == "dump" else before_after()
