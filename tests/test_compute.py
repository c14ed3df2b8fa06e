"""zsq.compute: device resolution, the precision decision, fp32 regions, and no stray devices."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import zsq.compute as compute_mod
from zsq.cli import main
from zsq.compute import Compute, as_compute, cpu_bf16_flags, fp32_region, resolve, resolve_device
from zsq.errors import ZsqError
from zsq.quant.quantizer import QuantSpec, UniformQuantizer


def test_cpu_flags_parsed_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx2\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_bf16_flags(f) == ("avx512_bf16",)
    f.write_text("flags\t: fpu sse avx2 amx_bf16 amx_tile avx512_bf16\n")
    assert cpu_bf16_flags(f) == ("avx512_bf16", "amx_bf16")
    f.write_text("flags\t: fpu sse avx2\n")
    assert cpu_bf16_flags(f) == ()
    assert cpu_bf16_flags(tmp_path / "absent") == ()  # no /proc (macOS, Windows): no native bf16 claimed


def test_auto_precision_follows_the_probe(monkeypatch):
    monkeypatch.setattr(compute_mod, "cpu_bf16_flags", lambda *a: ())
    c = resolve("cpu", "auto")
    assert (c.precision, c.requested, c.channels_last) == ("fp32", "auto", False)
    assert c.is_reference
    monkeypatch.setattr(compute_mod, "cpu_bf16_flags", lambda *a: ("avx512_bf16",))
    c = resolve("cpu", "auto")
    assert (c.precision, c.requested, c.channels_last) == ("bf16", "auto", True)
    assert resolve("cpu", "auto", channels_last=False).channels_last is False
    assert resolve("cpu", "fp32", channels_last=True).channels_last is True


def test_defaults_are_the_reference():
    assert resolve() == Compute() == as_compute(None)
    assert Compute().is_reference and not resolve("cpu", "bf16").is_reference
    assert as_compute({"precision": "bf16"}).precision == "bf16"


@pytest.mark.parametrize("bad,msg", [("tpu", "unknown device"), ("cuda:x", "unknown device"),
                                     ("meta", "unsupported device")])
def test_bad_devices_are_refused(bad, msg):
    with pytest.raises(ZsqError, match=msg):
        resolve_device(bad)
    with pytest.raises(ZsqError, match="precision must be"):
        resolve("cpu", "fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(capsys, tmp_path):
    with pytest.raises(ZsqError, match="no CUDA GPU"):
        resolve("cuda:1")
    out = tmp_path / "o"
    rc = main(["synthesize", "cifar10_resnet20", "--method", "noise", "--num-images", "4", "--out", str(out),
               "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("zsq: error: --device cuda") and not out.exists()
    assert resolve("auto").device in ("cpu", "mps")


def test_quantizer_grid_stays_float32_under_autocast():
    q = UniformQuantizer(QuantSpec(bits=4))
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(0)).bfloat16()  # a bf16 conv output
    ref = q(x.float())  # initialises the range, in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = q(x)
        assert torch.is_autocast_enabled("cpu")
        with fp32_region(x):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    # the same float32 codes: a bf16 grid would put values off the fp32 levels
    assert inside.dtype == torch.float32 and torch.equal(inside, ref)
    assert q.scale.dtype == torch.float32


class DeviceLog(TorchFunctionMode):
    """Records the device of every tensor any torch function returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.devices.add(t.device.type)
        return out


def test_explicit_cpu_device_creates_tensors_on_the_cpu_only():
    from zsq.synth import synthesize
    from tests.tiny_models import tiny_bn_cnn

    teacher = tiny_bn_cnn()
    with DeviceLog() as log:
        data = synthesize(teacher, "genie", 8, iters=2, batch_size=4, compute=resolve("cpu"))
    assert log.devices == {"cpu"} and data.images.device.type == "cpu"
    assert data.meta["compute"] == {"device": "cpu", "precision": "fp32", "precision_requested": "fp32",
                                    "channels_last": False, "compile": False}
