"""Synthesis under zsq.compute: fp32 untouched (bit-identical, no autocast), bf16 really runs in bf16."""
import torch
import torch.nn as nn

from zsq.compute import resolve
from zsq.synth import synthesize

TINY = dict(iters=4, batch_size=6)


def _autocast_seen(teacher):
    """Hooks that record, per forward of the first conv, whether autocast was on and the output dtype."""
    seen = []
    conv = next(m for m in teacher.modules() if isinstance(m, nn.Conv2d))
    return seen, conv.register_forward_hook(
        lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))


def test_fp32_is_the_reference_and_never_autocasts(tiny_teacher):
    seen, h = _autocast_seen(tiny_teacher)
    try:
        for method in ("genie", "zeroq", "hast"):
            a = synthesize(tiny_teacher, method, 12, **TINY)
            b = synthesize(tiny_teacher, method, 12, compute=resolve("cpu", "fp32"), **TINY)
            assert torch.equal(a.images, b.images)
    finally:
        h.remove()
    assert seen and all(not on and dt == torch.float32 for on, dt in seen)


def test_bf16_runs_the_teacher_in_bf16_and_keeps_images_float32(tiny_teacher, tmp_path):
    ref = synthesize(tiny_teacher, "zeroq", 12, **TINY)
    seen, h = _autocast_seen(tiny_teacher)  # synthesis works on a copy: hook the copy's origin
    try:
        out = synthesize(tiny_teacher, "zeroq", 12, compute=resolve("cpu", "bf16"), out=tmp_path / "z", **TINY)
    finally:
        h.remove()
    assert out.images.dtype == torch.float32 and out.images.is_contiguous()
    assert any(on and dt == torch.bfloat16 for on, dt in seen)
    assert not torch.equal(out.images, ref.images)
    # the same optimisation in another arithmetic: BNS (measured in fp32) lands close to fp32's
    assert abs(out.meta["bns_loss"] - ref.meta["bns_loss"]) <= 0.1 * ref.meta["bns_loss"]
    assert out.meta["compute"]["precision"] == "bf16" and out.meta["compute"]["channels_last"]


def test_resume_refuses_another_precision(tiny_teacher, tmp_path):
    import pytest

    from zsq.errors import ZsqError

    synthesize(tiny_teacher, "genie", 12, out=tmp_path, **TINY)
    with pytest.raises(ZsqError, match="compute"):
        synthesize(tiny_teacher, "genie", 12, out=tmp_path, resume=True, compute=resolve("cpu", "bf16"), **TINY)
