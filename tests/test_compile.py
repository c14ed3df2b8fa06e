"""zsq.compute compile=True: torch.compile of the training steps, equal to eager up to rounding.

Compiling is slow to start (tens of seconds even for these tiny models on a loaded 2-core machine), so
the end-to-end ZeroQ, Genie-D and reconstruction comparisons are marked slow; the swing plan (what lets a
compiled Genie-D teacher swing through eager's offsets) and the fp32 quantizer under bf16 run by default."""
import pytest
import torch

from tests.tiny_models import tiny_bn_cnn
from zsq.compute import Compute, resolve
from zsq.quant.quantizer import QuantSpec, UniformQuantizer
from zsq.synth import synthesize
from zsq.synth.swing import SwingConv2d, SwingPlan, swing_copy

TINY = dict(iters=4, batch_size=6)


def test_compile_is_an_explicit_choice_and_leaves_the_reference():
    c = resolve("cpu", "fp32", compile=True)
    assert c.compile and not c.is_reference and c.describe()["compile"] is True
    assert not resolve().compile and resolve().is_reference and resolve() == Compute()
    net = tiny_bn_cnn()
    assert resolve().runner(net) is net  # eager: the module itself
    assert c.runner(net) is c.runner(net) and c.runner(net) is not net  # one compiled twin, reused


def test_swing_plan_draws_the_offsets_eager_draws():
    teacher = swing_copy(tiny_bn_cnn())
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    swings = [m for m in teacher.modules() if isinstance(m, SwingConv2d)]
    eager_gen = torch.Generator().manual_seed(7)
    for m in swings:
        m.generator = eager_gen
    eager = [(teacher(x), [m.last_shift for m in swings]) for _ in range(6)]
    plan = SwingPlan(teacher, torch.zeros(1, 3, 16, 16))
    assert plan.order == swings
    gen = torch.Generator().manual_seed(7)
    for out, shifts in eager:
        plan.draw(gen)
        assert [m.last_shift for m in swings] == shifts
        assert torch.equal(teacher(x), out)  # the offset applied by index is the same copy as the slice
    assert len({s for _, sh in eager for s in sh}) > 1  # the offsets really changed between steps
    assert torch.equal(gen.get_state(), eager_gen.get_state())  # the same stream consumed


@pytest.mark.slow  # 23 s under load
def test_compiled_zeroq_matches_eager_to_rounding():
    teacher = tiny_bn_cnn()
    ref = synthesize(teacher, "zeroq", 6, **TINY)
    comp = resolve("cpu", "fp32", compile=True)
    out = synthesize(teacher, "zeroq", 6, compute=comp, **TINY)
    assert len(comp._compiled) == 1  # the teacher's step really ran compiled
    assert torch.allclose(out.images, ref.images, atol=1e-4, rtol=0)
    assert out.meta["bns_loss"] == pytest.approx(ref.meta["bns_loss"], rel=1e-4)
    assert out.meta["compute"]["compile"] is True


def test_compiled_bf16_quantizer_arithmetic_stays_float32():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    q = UniformQuantizer(QuantSpec(bits=4))
    net = torch.nn.Sequential(conv, q).requires_grad_(False)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    eager = resolve("cpu", "bf16", channels_last=False)
    ref = eager.forward(net, x)  # initialises the range (eager), then the compiled step reuses it
    comp = resolve("cpu", "bf16", channels_last=False, compile=True)
    out = comp.forward(net, x, step=True)
    assert out.dtype == torch.float32 and q.scale.dtype == torch.float32
    # fake-quantized in float32: values on the fp32 levels, the same codes as eager
    assert torch.equal(out, ref)
    levels = out / q.scale + q.zero_point
    assert torch.allclose(levels, levels.round(), atol=1e-4)


@pytest.mark.slow
def test_compiled_genie_synthesis_and_reconstruction_match_eager():
    from tests.tiny_models import make_tiny
    from zsq.methods.registry import QuantJob
    from zsq.ptq.reconstruction_methods import genie
    from zsq.quant import get_preset

    teacher = tiny_bn_cnn()
    ref = synthesize(teacher, "genie", 6, **TINY)
    out = synthesize(teacher, "genie", 6, compute=resolve("cpu", "fp32", compile=True), **TINY)
    assert torch.allclose(out.images, ref.images, atol=1e-3, rtol=0)  # same swings, same images to rounding

    imgs = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    res = []
    for c in (None, resolve("cpu", "fp32", compile=True)):
        torch.manual_seed(0)  # make_tiny leaves the linear's bias at torch's default (global-RNG) init
        res.append(genie(make_tiny(), get_preset("genie", "w4a4"),
                         QuantJob(calib=imgs, iters=6, batch_size=16, compute=c)))
    a, b = ([u["hard_loss"] for u in r.report["unit_losses"]] for r in res)
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    sa, sb = res[0].model.state_dict(), res[1].model.state_dict()
    assert max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].is_floating_point()) < 1e-3
