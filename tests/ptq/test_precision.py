"""Reconstruction under zsq.compute: explicit cpu/fp32 is the reference; bf16 trains in bf16 with fp32 grids."""
import torch

from zsq.compute import resolve
from zsq.methods.registry import QuantJob
from zsq.ptq.reconstruction_methods import genie
from zsq.quant import UniformQuantizer, get_preset


def _run(tiny, images, compute=None):
    job = QuantJob(calib=images, iters=6, batch_size=16, compute=compute)
    return genie(tiny, get_preset("genie", "w4a4"), job)


def test_explicit_fp32_cpu_is_bit_identical(tiny, tiny_images):
    a, b = _run(tiny, tiny_images), _run(tiny, tiny_images, resolve("cpu", "fp32"))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.report["compute"]["precision"] == "fp32"


def test_bf16_reconstruction_keeps_float32_state(tiny, tiny_images):
    ref = _run(tiny, tiny_images)
    res = _run(tiny, tiny_images, resolve("cpu", "bf16"))
    assert res.report["compute"] == {"device": "cpu", "precision": "bf16", "precision_requested": "bf16",
                                     "channels_last": True, "compile": False}
    quants = [m for m in res.model.modules() if isinstance(m, UniformQuantizer)]
    assert quants and all(q.scale.dtype == torch.float32 and bool(q.initialized) for q in quants)
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in res.model.parameters())
    # the returned model computes in fp32 on the CPU; its outputs track the fp32-trained model's
    out, out_ref = res.model(tiny_images), ref.model(tiny_images)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    agree = (out.argmax(1) == out_ref.argmax(1)).float().mean()
    assert agree >= 0.8, float(agree)
    losses = [u["hard_loss"] for u in res.report["unit_losses"]]
    ref_losses = [u["hard_loss"] for u in ref.report["unit_losses"]]
    assert all(l <= 2 * r + 1e-3 for l, r in zip(losses, ref_losses)), (losses, ref_losses)


def test_gptq_rounding_and_hardening_run_under_bf16(tiny, tiny_images):
    """GPTQ reads each layer's input inside the bf16-autocast forward: its row check and moments stay in
    float32/float64, for the closed-form rounding and for the hardening of learned soft bits alike."""
    for extra in ({"rounding": "gptq"}, {"hardening": "gptq"}):
        job = QuantJob(calib=tiny_images, iters=6, batch_size=16, compute=resolve("cpu", "bf16"), extra=extra)
        res = genie(tiny, get_preset("genie", "w4a8"), job)
        assert torch.isfinite(res.model(tiny_images)).all()
        if "hardening" in extra:
            assert all("hardening" in u for u in res.report["unit_losses"] if u["iters"])
