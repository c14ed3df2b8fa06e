"""benchmarks/quality_levers.py: the paired test and the accuracy-against-minutes plot that issue 15's
results rest on."""
import json
from types import SimpleNamespace

import pytest


def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_p(ql):
    a = [1, 1, 1, 0, 0, 1]
    b = [1, 0, 0, 1, 0, 1]
    n10, n01, p = ql.mcnemar(a, b)
    assert (n10, n01) == (2, 1)
    assert p == pytest.approx(1.0)  # 2 * P(X <= 1 | Bin(3, 1/2)) = 2 * 4/8, capped at 1
    n10, n01, p = ql.mcnemar([1] * 10, [0] * 10)
    assert (n10, n01) == (10, 0) and p == pytest.approx(2 / 2 ** 10)
    with pytest.raises(SystemExit, match="different image sets"):
        ql.mcnemar([1, 0], [1])


def _run(tmp_path, tag, top1, calib, synth_s, quant_s):
    (tmp_path / f"{tag}.json").write_text(json.dumps(
        {"tag": tag, "top1": top1, "calib": calib, "synth_seconds": synth_s, "quant_seconds": quant_s}))


def test_curve_puts_each_series_on_the_stage_that_changed(ql, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _run(tmp_path, "it20", 60.0, "synthetic:genie:a", 600, 600)
    _run(tmp_path, "it50", 65.0, "synthetic:genie:a", 600, 1500)
    _run(tmp_path, "s100", 66.0, "synthetic:genie:b", 1200, 1500)
    _run(tmp_path, "real", 75.0, "real", 0, 1500)
    out = tmp_path / "c.png"
    ql.cmd_curve(SimpleNamespace(dir=str(tmp_path), out=str(out), title=None, ref=["real"],
                                 series=["recon=it20,it50", "synth=it50,s100"]))
    text = capsys.readouterr().out
    assert "recon (reconstruction): it20 60.00 % at 10.0 min, it50 65.00 % at 25.0 min" in text
    assert "synth (synthesis): it50 65.00 % at 10.0 min, s100 66.00 % at 20.0 min" in text
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no run 'missing'"):
        ql.cmd_curve(SimpleNamespace(dir=str(tmp_path), out=str(out), title=None, ref=None,
                                     series=["x=missing"]))


def test_compare_pairs_runs_and_names_a_missing_one(ql, tmp_path, capsys):
    for tag, hits in (("a", [1, 1, 1, 0]), ("b", [1, 0, 0, 1])):
        (tmp_path / f"{tag}.json").write_text(json.dumps({"tag": tag, "top1": 100.0 * sum(hits) / 4, "hits": hits}))
    ql.cmd_compare(SimpleNamespace(dir=str(tmp_path), base="a", others=["b"]))
    assert "a 75.00 vs b 50.00: only base right 2, only b right 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no run 'c'"):
        ql.cmd_compare(SimpleNamespace(dir=str(tmp_path), base="a", others=["c"]))


def test_hits_of_a_checkpoint_are_the_saved_models_own_per_image_results(ql, tmp_path, monkeypatch, capsys):
    """`hits` evaluates a packed checkpoint (zsq quantize --out) so end-to-end runs can be paired with `compare`."""
    import numpy as np

    from tests.tiny_models import TINY_META, tiny_factory, tiny_quantized
    from zsq.evaluation import evaluate
    from zsq.export import packed_checkpoint as ckpt_mod
    from zsq.export import save_quantized

    monkeypatch.setattr(ckpt_mod, "_build_model", lambda name, factory: tiny_factory(seed=9))
    monkeypatch.setattr(ql, "OUT", tmp_path / "levers")
    q = tiny_quantized("genie", "w4a4")
    save_quantized(q, tmp_path / "ck", model_name="tiny_resnet", info={"bits": "w4a4"})
    _, h, w = TINY_META.input_size
    rng = np.random.default_rng(3)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.integers(0, 256, (40, h, w, 3), dtype=np.uint8), y=rng.integers(0, 10, 40))
    ql.cmd_hits(SimpleNamespace(checkpoint=str(tmp_path / "ck"), tag="e2e", eval_data=str(data), threads=1))
    rec = json.loads((tmp_path / "levers" / "e2e.json").read_text())
    ev = evaluate(q, str(data), return_preds=True)
    labels = np.load(data)["y"]
    assert rec["hits"] == [int(p == y) for p, y in zip(ev["preds"], labels)]
    assert 0 < sum(rec["hits"]) < 40  # a tiny random model: some right, some wrong, so the check means something
    assert rec["top1"] == pytest.approx(100.0 * sum(rec["hits"]) / 40) and rec["n"] == 40
    assert rec["report"] == {"bits": "w4a4"}
    assert '"tag": "e2e"' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="hits: checkpoint .*missing does not exist"):
        ql.cmd_hits(SimpleNamespace(checkpoint=str(tmp_path / "missing"), tag="x", eval_data=None, threads=1))
    with pytest.raises(SystemExit, match="tiny_resnet has no default evaluation images here; give --eval-data"):
        ql.cmd_hits(SimpleNamespace(checkpoint=str(tmp_path / "ck"), tag="x", eval_data=None, threads=1))


def test_rtn_unit_leaves_that_unit_at_round_to_nearest_and_names_a_missing_one(ql):
    """`run --rtn-unit U`: U keeps round-to-nearest on its starting grid while the other units are reconstructed."""
    import torch

    from tests.tiny_models import tiny_factory, tiny_images
    from zsq.methods.registry import QuantJob
    from zsq.ptq.reconstruction_methods import genie
    from zsq.ptq.units import find_units
    from zsq.quant import get_preset
    from zsq.quant.transforms import quantize_model

    fp, qc = tiny_factory(seed=1), get_preset("genie", "w4a4")
    start = quantize_model(fp, qc)
    units = find_units(start, "block")
    kept, trained = units[-1], units[-2]

    def rtn(name):
        layer = start.get_submodule(name)
        return layer.weight_quant(layer.weight.detach())

    job = QuantJob(calib=tiny_images(16), iters=20, batch_size=8, seed=0)
    with ql._round_to_nearest([kept.name]):
        q = genie(fp, qc, job).model
    assert all(torch.equal(q.get_submodule(n).weight, rtn(n)) for n in kept.layers)
    assert not all(torch.equal(q.get_submodule(n).weight, rtn(n)) for n in trained.layers)  # reconstruction moved it
    with pytest.raises(SystemExit, match=r"--rtn-unit: no unit named \['nope'\]"):
        with ql._round_to_nearest(["nope"]):
            genie(fp, qc, QuantJob(calib=tiny_images(8), iters=1, batch_size=8, seed=0))


def test_distill_and_kl_refuse_in_one_line_what_they_cannot_do(ql, tmp_path, monkeypatch):
    """A bad option is named before anything loads; a model without known float weights is named."""
    from tests.tiny_models import tiny_factory, tiny_quantized
    from zsq.export import packed_checkpoint as ckpt_mod
    from zsq.export import save_quantized

    args = dict(checkpoint=str(tmp_path / "none"), images="x", tag="t", seed=0, eval_data=None, threads=1)
    with pytest.raises(SystemExit, match="distill has no option lr_v"):
        ql.cmd_distill(SimpleNamespace(set=["lr_v=1"], **args))
    with pytest.raises(SystemExit, match="distill_params must be one of"):
        ql.cmd_distill(SimpleNamespace(set=["params=weights"], **args))
    monkeypatch.setattr(ckpt_mod, "_build_model", lambda name, factory: tiny_factory(seed=9))
    save_quantized(tiny_quantized("genie", "w4a4"), tmp_path / "ck", model_name="tiny_resnet")
    args["checkpoint"] = str(tmp_path / "ck")
    with pytest.raises(SystemExit, match="distill: no float weights known for tiny_resnet"):
        ql.cmd_distill(SimpleNamespace(set=["iters=1"], **args))
    with pytest.raises(SystemExit, match="kl: no float weights known for tiny_resnet"):
        ql.cmd_kl(SimpleNamespace(checkpoint=str(tmp_path / "ck"), sets=["x"], threads=1))


def test_act_errors_are_each_quantizers_own_error_and_clipping_on_the_probe(ql):
    """`ranges`: a min/max range set on the probe images themselves clips next to nothing (a value at the edge
    from the zero point's rounding) and errs little; the same range shrunk to a tenth clips and errs far more,
    quantizer by quantizer."""
    import torch

    from tests.tiny_models import tiny_factory, tiny_images
    from zsq.quant import get_preset
    from zsq.quant.calibration import calibrate
    from zsq.quant.transforms import quantize_model
    from zsq.quant.inventory import act_quantizers

    x = tiny_images(16)
    q = quantize_model(tiny_factory(seed=1), get_preset("gdfq", "w8a8"))  # min/max ranges
    calibrate(q, x)
    full = ql._act_errors(q, x)
    assert [r[0] for r in full] == [n for n, _ in act_quantizers(q)]
    assert all(clip < 1e-3 and 0.0 < err < 1e-3 for _, _, err, clip in full)
    for _, aq in act_quantizers(q):
        s, z = aq.qparams()
        aq.set_range((aq.qmin - z) * s / 10, (aq.qmax - z) * s / 10)
    shrunk = ql._act_errors(q, x)
    assert all(b[3] > 0.05 and b[2] > 10 * a[2] for a, b in zip(full, shrunk))
    assert all(b[1] == pytest.approx(a[1] / 10, rel=1e-4) for a, b in zip(full, shrunk))


def test_concat_joins_synthetic_sets_in_order_and_refuses_an_existing_tag(ql, tmp_path, monkeypatch, capsys):
    import torch

    from zsq.synth.dataset import SyntheticSet

    monkeypatch.setattr(ql, "OUT", tmp_path)
    a, b = torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)
    SyntheticSet(a, None, {"seed": 0, "seconds": 10.0}).save(tmp_path / "synth-a")
    SyntheticSet(b, None, {"seed": 1, "seconds": 5.0}).save(tmp_path / "synth-b")
    ql.cmd_concat(SimpleNamespace(out="ab", tags=["a", "b"]))
    joined = SyntheticSet.load(tmp_path / "synth-ab")
    assert torch.equal(joined.images, torch.cat([a, b]))
    assert joined.meta["seeds"] == [0, 1] and joined.meta["seconds"] == 15.0 and joined.meta["concat_of"] == ["a", "b"]
    assert "5 images from a, b" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        ql.cmd_concat(SimpleNamespace(out="ab", tags=["a"]))
    SyntheticSet(torch.randn(1, 3, 4, 4), None, {}).save(tmp_path / "synth-c")
    with pytest.raises(SystemExit, match="differ in shape"):
        ql.cmd_concat(SimpleNamespace(out="ac", tags=["a", "c"]))


def test_row_turns_a_bench_cell_into_a_run_that_compare_pairs(ql, tmp_path, monkeypatch, capsys):
    """`row CELL --tag T` writes the cell's main-set hits and figures as runs/levers/T.json; a cell without
    hits, or a folder without row.json, is refused in one line and nothing is written."""
    monkeypatch.setattr(ql, "OUT", tmp_path / "levers")
    cell = tmp_path / "cells" / "003"
    cell.mkdir(parents=True)
    row = {"key": "m|genie|w4a4|genie|-|seed=0", "main": {"top1": 60.0, "n": 5, "hits": "10110"},
           "threads": 2, "synth_seconds": 1.5, "quant_seconds": 2.5, "peak_rss_mib": 10.0,
           "unit_losses": [{"unit": "a", "hard_loss": 1.0}]}
    (cell / "row.json").write_text(json.dumps(row))
    ql.cmd_row(SimpleNamespace(cell=str(cell), tag="cellrun"))
    rec = json.loads((tmp_path / "levers" / "cellrun.json").read_text())
    assert rec["hits"] == [1, 0, 1, 1, 0] and rec["top1"] == 60.0 and rec["n"] == 5
    assert rec["threads"] == 2 and rec["units"] == row["unit_losses"] and row["key"] in rec["source"]
    other = {"tag": "other", "top1": 40.0, "hits": [0, 0, 1, 1, 0]}
    (tmp_path / "levers" / "other.json").write_text(json.dumps(other))
    capsys.readouterr()
    ql.cmd_compare(SimpleNamespace(dir=str(tmp_path / "levers"), base="cellrun", others=["other"]))
    assert "only base right 1, only other right 0" in capsys.readouterr().out
    (cell / "row.json").write_text(json.dumps({**row, "main": {"top1": 60.0, "n": 5}}))
    with pytest.raises(SystemExit, match="no per-image hits"):
        ql.cmd_row(SimpleNamespace(cell=str(cell), tag="nohits"))
    with pytest.raises(SystemExit, match="does not exist"):
        ql.cmd_row(SimpleNamespace(cell=str(tmp_path / "none"), tag="missing"))
    assert not (tmp_path / "levers" / "nohits.json").exists() and not (tmp_path / "levers" / "missing.json").exists()
