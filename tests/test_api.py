"""zsq.quantize as a library call: reproducible from its seed, and the caller's RNG left alone."""
import hashlib

import pytest
import torch

import zsq


def _digest(out):
    """The saved tensors (the JSON files also hold timings)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def _run(out, **kw):
    return zsq.quantize(zsq.ModelSource("cifar10_resnet20", random_init=True), method="minmax", bits="w4a4",
                        preset="gdfq", calibration=zsq.Calibration(synth="noise", num_images=8), seed=3, out=out, **kw)


def test_quantize_leaves_the_global_rng_alone_and_depends_only_on_its_seed(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _run(tmp_path / "a")  # random init (no weights) + noise synthesis + calibration + save
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)  # another caller state: same model
    _run(tmp_path / "b")
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a and a == b
    torch.manual_seed(123)
    c = zsq.quantize(zsq.ModelSource("cifar10_resnet20", random_init=True), method="minmax", bits="w4a4",
                     preset="gdfq", calibration=zsq.Calibration(synth="noise", num_images=8), seed=4, out=tmp_path / "c")
    assert c.report["method"] == "minmax" and _digest(tmp_path / "c") != a  # the seed does reach the result


def test_evaluate_leaves_the_global_rng_alone():
    """A DataLoader draws its base seed from the global RNG unless given a generator."""
    model = zsq.models.load("cifar10_resnet20")  # the seeded random network
    x, y = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 10
    before = torch.get_rng_state()
    assert zsq.evaluate(model, (x, y), batch_size=4)["n"] == 6
    assert torch.equal(torch.get_rng_state(), before)


def test_a_checkpoint_of_a_users_module_says_how_to_load_it(tmp_path):
    """A model given as an nn.Module is recorded as such; loading it without a factory is a clear refusal
    (not a failed import of a module named 'module'), and with one it gives the saved model."""
    import torch.nn as nn

    class MyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.b, self.f = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)

        def forward(self, x):
            return self.f(torch.relu(self.b(self.c(x))).mean((2, 3)))

    net = MyNet().eval()
    res = zsq.quantize(zsq.ModelSource(net, input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3),
                       method="bn-minmax", bits="w8a8", out=tmp_path / "q")
    with pytest.raises(zsq.ZsqError, match=r"given to zsq as an nn.Module \(MyNet\).*model_factory"):
        zsq.load_quantized(tmp_path / "q")
    again = zsq.load_quantized(tmp_path / "q", model_factory=lambda name: MyNet())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(x), res.model(x))
