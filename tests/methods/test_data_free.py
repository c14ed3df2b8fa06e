"""squant / dfq as methods: through the CLI (one-line refusals), DFQ's transform before bn-minmax, checkpoints
of DFQ-transformed models, the bench suite, and (on the shared teachers) SQuant against round-to-nearest."""
import json

import pytest
import torch
import torch.nn as nn

import zsq
from zsq.assets import CIFAR10_EXACT, RESNET20
from zsq.bench.suites import get_suite
from zsq.cli import main
from zsq.export.packed_checkpoint import load_quantized, save_quantized
from zsq.methods import QuantJob, get_method
from zsq.models.meta import set_meta
from tests.conftest import need_asset
from tests.quant.test_equalize import META, Chain, _x


def test_cli_refuses_a_bad_option_in_one_line(capsys, tmp_path):
    code = main(["quantize", "cifar10_resnet20", "--random-init", "--method", "squant", "--set", "mode=squant-z",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().startswith("zsq: error:") and "mode" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, extra", [("dfq", {}), ("bn-minmax", {"equalize": True, "bias_correct": True}),
                                           ("squant", {"equalize": True, "bias_correct": True})])
def test_dfq_transform_reports_and_survives_a_checkpoint(method, extra, tmp_path):
    factory = lambda name="chain": set_meta(Chain(nn.ReLU6, depthwise=True).eval(), META)  # noqa: E731
    m = factory()
    res = get_method(method).fn(m, zsq.get_preset("genie", "w4a4"), QuantJob(extra=extra))
    rep = res.report["dfq"]
    assert {(p["conv1"], p["conv2"]) for p in rep["equalized_pairs"]} == {("c1", "c2"), ("c2", "dw"), ("dw", "c3")}
    assert {c["layer"] for c in res.report["bias_correction"]["corrected"]} == {"c2", "dw", "c3"}
    x = _x(4, 3)
    with torch.no_grad():
        out = res.model(x)
    save_quantized(res.model, tmp_path / "ck", model_name="chain")
    again = load_quantized(tmp_path / "ck", model_factory=factory)
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_bn_minmax_without_options_is_unchanged_by_the_new_ones():
    m = set_meta(Chain(nn.ReLU).eval(), META)
    cfg = zsq.get_preset("genie", "w4a4")
    a = get_method("bn-minmax").fn(m, cfg, QuantJob()).model
    b = get_method("bn-minmax").fn(m, cfg, QuantJob(extra={"equalize": False, "bias_correct": False})).model
    with torch.no_grad():
        assert torch.equal(a(_x()), b(_x()))
    assert "dfq" not in get_method("bn-minmax").fn(m, cfg, QuantJob()).report


def test_data_free_suite_pairs_every_method_with_bn_minmax():
    cells = get_suite("data-free").cells
    for model in ("cifar10_resnet20", "efficientnet_lite0"):
        for bits in ("w8a8", "w6a6", "w4a8", "w4a4"):
            got = {c.method for c in cells if c.model == model and c.bits == bits and c.preset is None}
            assert got == {"bn-minmax", "squant", "dfq"}


def test_squant_output_is_closer_to_fp32_than_round_to_nearest_on_resnet20():
    from zsq.data import load_dataset

    weights, data = str(need_asset(RESNET20)), str(need_asset(CIFAR10_EXACT)) + "[:128]"
    m = zsq.models.load("cifar10_resnet20", weights=weights)
    x = torch.stack([load_dataset(data, m.zsq_meta)[i][0] for i in range(128)])
    with torch.no_grad():
        ref = m(x)
    for bits in ("w4a8", "w4a4"):
        cfg = zsq.get_preset("gdfq", bits)  # every layer at 4 weight bits
        errs = {}
        for mode in ("squant", "squant-e"):  # squant-e: round to nearest, same grid and ranges
            q = get_method("squant").fn(m, cfg, QuantJob(extra={"mode": mode})).model
            with torch.no_grad():
                errs[mode] = float((q(x) - ref).pow(2).mean())
        assert errs["squant"] < 0.9 * errs["squant-e"], (bits, errs)


def test_genie_after_cle_reconstructs_the_equalized_model_and_survives_a_checkpoint(tmp_path):
    """--set equalize=true on a reconstruction method: DFQ's transform first, reported, in the checkpoint."""
    factory = lambda name="chain": set_meta(Chain(nn.ReLU6, depthwise=True).eval(), META)  # noqa: E731
    m = factory()
    images = _x(16, 5)
    job = QuantJob(calib=images, iters=2, batch_size=8, extra={"equalize": True})
    res = get_method("genie").fn(m, zsq.get_preset("genie", "w4a4"), job)
    pairs = {(p["conv1"], p["conv2"]) for p in res.report["dfq"]["equalized_pairs"]}
    assert pairs == {("c1", "c2"), ("c2", "dw"), ("dw", "c3")}
    plain = get_method("genie").fn(m, zsq.get_preset("genie", "w4a4"), QuantJob(calib=images, iters=2, batch_size=8))
    assert "dfq" not in plain.report
    x = _x(4, 3)
    with torch.no_grad():
        out = res.model(x)
        assert not torch.equal(out, plain.model(x))  # the transform changed what was quantized
    save_quantized(res.model, tmp_path / "ck", model_name="chain")
    again = load_quantized(tmp_path / "ck", model_factory=factory)
    with torch.no_grad():
        assert torch.equal(again(x), out)
