"""The bench harness on a two-cell suite with tiny budgets: every column filled, plots written,
re-runs do no work, a partial results.json is completed."""
import json

import pytest
import torch

import zsq.assets
from tests.conftest import need_asset
from zsq.bench.cell import wilson
from zsq.bench.papers import nearest_figure
from zsq.bench.report import write_report
from zsq.bench.runner import RESULTS, load_results, run_suite, save_results
from zsq.bench.suites import Cell, Suite, get_suite, list_suites
from zsq.errors import ZsqError

M = "cifar10_resnet20"


def tiny_suite() -> Suite:
    cells = (Cell(M, "bn-minmax", "w8a8"),
             Cell(M, "genie", "w4a4", data="noise", num_images=16, iters=2, batch_size=8, synth_iters=2))
    return Suite("tiny", "two tiny cells", cells, jpeg_eval=True, eval_limit=64)


def test_wilson_interval_values():
    lo, hi = wilson(90, 100)
    assert lo == pytest.approx(82.56, abs=0.05) and hi == pytest.approx(94.48, abs=0.05)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 100.0


def test_paper_figures_nearest_and_labelled():
    f = nearest_figure(M, "hast", "hast", (4, 4))
    assert f["top1"] == 92.36 and f["exact"] and f["note"] == "different teacher"
    g = nearest_figure(M, "gdfq", "none", (2, 4))  # no W2A4 figure: nearest is W3A3
    assert g["setting"] == "W3A3" and not g["exact"]
    assert nearest_figure(M, "bn-minmax", "none", (4, 4)) is None
    assert nearest_figure(M, "genie", "real", (4, 4)) is None  # real-data figure is QAT, not PTQ
    assert nearest_figure(M, "genie", "zeroq", (4, 4))["method"] == "zeroq"
    s = nearest_figure(M, "synq", "synq", (3, 3))
    assert s["top1"] == 88.11 and s["exact"] and s["note"] == "different teacher"


def test_suites_defined():
    assert {"smoke", "cifar10-resnet20", "imagenet-lite0", "deploy-resnet20"} <= set(list_suites())
    d = get_suite("deploy-resnet20").cells  # every method once on its paper preset, once on deploy, W8A8
    assert {x.bits for x in d} == {"w8a8"} and {x.preset for x in d} == {None, "deploy"}
    assert {x.method for x in d if x.preset is None} == {x.method for x in d if x.preset == "deploy"} == {
        "bn-minmax", "genie", "brecq", "qdrop", "adaround", "gdfq", "ait", "hast"}
    c = get_suite("cifar10-resnet20")
    assert {x.bits for x in c.cells} == {"w2a4", "w3a3", "w4a4", "w5a5", "w8a8"}
    with pytest.raises(ZsqError):
        get_suite("nope")
    with pytest.raises(ZsqError):
        Cell(M, "genie", "w4a4", data="imagenet")


def test_harness_end_to_end_resume(tmp_path):
    need_asset(zsq.assets.RESNET20)
    need_asset(zsq.assets.CIFAR10_EXACT)
    need_asset(zsq.assets.CIFAR10_JPEG)
    torch.set_num_threads(1)
    suite = tiny_suite()
    ran = []
    res = run_suite(suite, tmp_path, isolate=False, on_cell=ran.append)
    assert ran == [c.key for c in suite.cells]
    rows = [res["cells"][c.key] for c in suite.cells]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["main"]["n"] == 64 and r["jpeg"]["n"] == 64
        lo, hi = r["main"]["ci95"]
        assert lo <= r["main"]["top1"] <= hi
        assert 0 <= r["main"]["agreement"] <= 100 and r["peak_rss_mib"] > 50
        hits = r["main"]["hits"]
        assert len(hits) == 64 and set(hits) <= {"0", "1"}
        assert 100 * hits.count("1") / 64 == pytest.approx(r["main"]["top1"])  # the row's own accuracy
    assert rows[0]["num_images"] is None and rows[0]["main"]["agreement"] > 80  # W8A8 ~ FP32
    assert rows[1]["num_images"] == 16 and rows[1]["synth_seconds"] > 0 and rows[1]["unit_losses"]
    report = write_report(tmp_path).read_text()
    table = [ln for ln in report[report.index("## All cells"):].splitlines() if ln.startswith(f"| {M}")]
    assert len(table) == 2 and all("| |" not in ln and "FAILED" not in ln for ln in table)
    for f in ("accuracy_vs_time.png", "grid_noise.png", "ptq_unit_losses.png"):
        assert (tmp_path / "plots" / f).stat().st_size > 1000
    assert "different teacher" in report and "torch" in report
    # the genie row against bn-minmax is only at the same bits: here W4A4 vs W8A8, so no pair
    assert "## Paired on the same images" in report and "No pairs with per-image hits to compare." in report
    summary = report[report.index("## Summary"):report.index("## All cells")]
    assert "| W8A8 | W4A4 |" in summary
    assert f"| {M} | bn-minmax | - | none | {rows[0]['main']['top1']:.2f} / {rows[0]['jpeg']['top1']:.2f} |  |" in summary
    assert f"| {M} | genie | - | noise |  | {rows[1]['main']['top1']:.2f} / {rows[1]['jpeg']['top1']:.2f} |" in summary
    assert rows[0]["main"]["fp32_top1"] == rows[1]["main"]["fp32_top1"]
    assert (tmp_path / "fp32" / f"{M}-exact-1017-64.json").exists()  # FP32 evaluated once per set (named by set)

    # a finished suite does no work
    ran.clear()
    run_suite(suite, tmp_path, isolate=False, on_cell=ran.append)
    assert ran == []

    # a partial results.json (second cell lost) is completed, keeping the first cell's row
    partial = load_results(tmp_path)
    first = partial["cells"][suite.cells[0].key]
    del partial["cells"][suite.cells[1].key]
    save_results(tmp_path, partial)
    run_suite(suite, tmp_path, isolate=False, on_cell=ran.append)
    assert ran == [suite.cells[1].key]
    done = json.loads((tmp_path / RESULTS).read_text())
    assert done["cells"][suite.cells[0].key] == first and len(done["cells"]) == 2
    assert done["cells"][suite.cells[1].key]["synth_cached"] is True  # the synthetic set was reused


def test_refuses_other_suite_in_same_dir(tmp_path):
    save_results(tmp_path, {"suite": "other", "budget": "quick", "cells": {}})
    with pytest.raises(ZsqError):
        run_suite(tiny_suite(), tmp_path)


def test_refuses_results_evaluated_on_another_set(tmp_path):
    lite = Cell("efficientnet_lite0", "bn-minmax", "w8a8")
    suite = Suite("lite", "one Lite0 cell", (lite,), jpeg_eval=False)
    row = {"model": "efficientnet_lite0", "main": {"set": "val1300", "top1": 83.0}}  # before the real-data split
    save_results(tmp_path, {"suite": "lite", "budget": "quick", "cells": {lite.key: row}})
    before = (tmp_path / RESULTS).read_bytes()
    with pytest.raises(ZsqError, match=r"evaluated on val1300, this version evaluates efficientnet_lite0 on val1300\[256:\]"):
        run_suite(suite, tmp_path, resume=True)
    assert (tmp_path / RESULTS).read_bytes() == before


def test_lite0_real_reference_is_disjoint_from_its_evaluation_set():
    from zsq.bench.suites import MODELS

    setup = MODELS["efficientnet_lite0"]
    assert setup.real_calib.endswith("val1300[0:256]") and setup.eval_main.endswith("val1300[256:]")
    cells = get_suite("imagenet-lite0").cells
    assert any(c.data == "real" for c in cells)


def test_cli_registered_and_report_only(tmp_path, capsys):
    from zsq.cli import main

    save_results(tmp_path, {"suite": "smoke", "budget": "quick", "description": "d", "pruned": "",
                            "machine": {"platform": "p", "cores": 2, "python": "3", "torch": "t",
                                        "threads_per_cell": 1},
                            "wall_seconds": 0.0, "cells": {}, "order": ["a|b"]})
    assert main(["bench", "--suite", "smoke", "--out", str(tmp_path), "--report-only", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["done"] == 0 and out["cells"] == 3
    assert "Not run yet: 1 cells" in (tmp_path / "report.md").read_text()


def test_cell_timeout_recorded_and_retried(tmp_path):
    need_asset(zsq.assets.RESNET20)
    need_asset(zsq.assets.CIFAR10_EXACT)
    suite = Suite("t", "t", (Cell(M, "bn-minmax", "w8a8"),), jpeg_eval=False, eval_limit=16)
    res = run_suite(suite, tmp_path, cell_timeout=0.01)  # subprocess killed at once
    row = res["cells"][suite.cells[0].key]
    assert "timed out" in row["error"] and row["wall_seconds"] >= 0
    assert "FAILED after" in write_report(tmp_path).read_text()
    ran = []
    run_suite(suite, tmp_path, on_cell=ran.append, only="*|w4a4|*")
    assert ran == []  # filtered out by --only


def test_merge_copies_finished_cells_only(tmp_path):
    from zsq.bench.runner import merge_results

    base = {"suite": "smoke", "budget": "quick", "wall_seconds": 5.0}
    a, b = tmp_path / "a", tmp_path / "b"
    save_results(a, dict(base, cells={"k1": {"key": "k1", "wall_seconds": 5.0, "main": {"top1": 1}},
                                      "k2": {"key": "k2", "error": "boom", "wall_seconds": 1.0}}))
    save_results(b, dict(base, cells={"k1": {"key": "k1", "wall_seconds": 9.0, "main": {"top1": 2}},
                                      "k2": {"key": "k2", "wall_seconds": 7.0, "main": {"top1": 3},
                                             "synth_dir": "synth/set-k2"},
                                      "k3": {"key": "k3", "error": "x", "wall_seconds": 1.0}}))
    (b / "synth" / "set-k2").mkdir(parents=True)
    (b / "synth" / "set-k2" / "grid.png").write_bytes(b"png")
    merged = merge_results(a, b)
    assert (a / "synth" / "set-k2" / "grid.png").read_bytes() == b"png"  # the set comes along
    assert merged["cells"]["k1"]["main"]["top1"] == 1            # a's finished row kept
    assert merged["cells"]["k2"]["main"]["top1"] == 3            # a's failed row replaced
    assert "k3" not in merged["cells"]                            # failures are not copied
    assert merged["wall_seconds"] == 12.0 and load_results(a) == merged
    save_results(b, dict(base, suite="other", cells={}))
    with pytest.raises(ZsqError, match="suite other"):
        merge_results(a, b)
    with pytest.raises(ZsqError, match="no results.json"):
        merge_results(a, tmp_path / "missing")


def test_resume_picks_up_row_written_after_runner_died(tmp_path):
    need_asset(zsq.assets.RESNET20)
    need_asset(zsq.assets.CIFAR10_EXACT)
    suite = Suite("t", "t", (Cell(M, "bn-minmax", "w8a8"),), jpeg_eval=False, eval_limit=16)
    key = suite.cells[0].key
    run_suite(suite, tmp_path, cell_timeout=0.01)  # leaves cells/000/cell.json, no row
    cell_dir = tmp_path / "cells" / "000"
    orphan_row = {"key": key, "main": {"top1": 42.0, "set": "exact-1017"}, "total_seconds": 123.0}
    (cell_dir / "row.json").write_text(json.dumps(orphan_row))
    res = run_suite(suite, tmp_path, resume=True, cell_timeout=0.01)  # would time out if it ran
    row = res["cells"][key]
    assert "error" not in row and row["main"]["top1"] == 42.0 and row["picked_up"]
    assert row["wall_seconds"] == 123.0
    # A row left by a different cell spec (here: another eval limit) is not taken; the cell runs again.
    spec = json.loads((cell_dir / "cell.json").read_text())
    (cell_dir / "cell.json").write_text(json.dumps(dict(spec, eval_limit=99)))
    res["cells"][key] = {"key": key, "error": "retry me", "wall_seconds": 0.0}
    save_results(tmp_path, res)
    again = run_suite(suite, tmp_path, resume=True, cell_timeout=0.01)
    assert "timed out" in again["cells"][key]["error"]
    assert not (cell_dir / "row.json").exists()


def test_summary_keeps_cells_that_differ_only_in_preset():
    from zsq.bench.report import summary_table

    def row(preset, top1):
        c = Cell(M, "bn-minmax", "w8a8", preset=preset)
        return c.key, {"cell": c.to_dict(), "main": {"top1": top1}}

    cells = dict([row(None, 91.84), row("deploy", 91.94)])
    lines = summary_table({"cells": cells, "order": list(cells)})
    assert lines[0].startswith("| model | method | preset | data |")
    assert any("| bn-minmax | - | none | 91.84 |" in ln for ln in lines)
    assert any("| bn-minmax | deploy | none | 91.94 |" in ln for ln in lines)


def test_resume_refuses_rows_of_other_code(tmp_path):
    from zsq.runstate import source_digest

    cell = Cell(M, "bn-minmax", "w8a8")
    suite = Suite("t", "t", (cell,), jpeg_eval=False, eval_limit=16)
    row = {"key": cell.key, "cell": cell.to_dict(), "model": M, "method": "bn-minmax", "bits": "w8a8",
           "data": "none", "code": "0123456789abcdef",
           "main": {"set": "exact-1017", "top1": 91.0, "n": 16, "ci95": [80.0, 95.0]}, "wall_seconds": 1.0}
    save_results(tmp_path, {"suite": "t", "budget": "quick", "machine": {"platform": "p", "cores": 2, "python": "3",
                            "torch": "2", "threads_per_cell": 1}, "wall_seconds": 1.0, "cells": {cell.key: row}})
    before = (tmp_path / RESULTS).read_bytes()
    with pytest.raises(ZsqError, match=r"1 finished cell\(s\) .* other zsq code \(source 0123456789abcdef; this is "
                       + source_digest() + r"\).*--allow-mixed-code"):
        run_suite(suite, tmp_path, resume=True)
    assert (tmp_path / RESULTS).read_bytes() == before
    ran = []
    res = run_suite(suite, tmp_path, resume=True, on_cell=ran.append, allow_mixed_code=True)
    assert ran == [] and res["cells"][cell.key]["code"] == "0123456789abcdef"  # kept, not re-run
    from zsq.bench.report import _code_line

    assert _code_line([row]) == "Code: zsq sources 0123456789abcdef (sha256 of zsq/**/*.py, every row)."
    mixed = _code_line([row, dict(row, key="new", code=source_digest()), dict(row, key="x", error="boom")])
    assert "rows made by different zsq sources" in mixed and "0123456789abcdef: 1 row(s)" in mixed
    assert f"{source_digest()}: 1 row(s) (new)" in mixed   # the failed row is not counted


def _row(method, data, bits, hits, preset="genie", iters=None):
    c = Cell(M, method, bits, data=data, iters=iters)
    return c.key, {"key": c.key, "cell": c.to_dict(), "preset": preset,
                   "main": {"top1": 100 * hits.count("1") / max(len(hits), 1), **({"hits": hits} if hits else {})}}


def test_report_pairs_each_row_with_its_real_reference_and_bn_minmax_at_the_same_bits():
    from zsq.bench.report import paired_lines

    cells = dict([_row("genie", "genie", "w4a4", "1100110011"),
                  _row("genie", "real", "w4a4", "1111110000"),
                  _row("bn-minmax", "none", "w4a4", "0000000011"),
                  _row("bn-minmax", "none", "w8a8", "1111111111"),
                  _row("qdrop", "genie", "w4a4", "1111111111", preset="qdrop"),  # other preset: not vs bn-minmax
                  _row("genie", "zeroq", "w4a4", ""),                           # made before hits were kept
                  _row("genie", "genie", "w4a4", "1111111111", iters=7)])        # other budget: not vs real
    lines = paired_lines({"cells": cells, "order": list(cells)})
    table = [ln for ln in lines if ln.startswith("| genie/")]
    # genie 1100110011 vs real 1111110000: only real right at images 2, 3; only genie right at 8, 9
    assert "| genie/genie w4a4 | real-data reference | 60.00 | 60.00 | 2 | 2 | 1 |" in table
    assert "| genie/genie w4a4 | bn-minmax | 60.00 | 20.00 | 0 | 4 | 0.125 |" in table
    assert "| genie/real w4a4 | bn-minmax | 60.00 | 20.00 | 2 | 6 | 0.289 |" in table
    assert "| genie/genie w4a4 | bn-minmax | 100.00 | 20.00 | 0 | 8 | 0.00781 |" in table  # the iters=7 row
    assert len(table) == 4 and not any(ln.startswith("| qdrop/") for ln in lines)
    assert lines[-1] == "2 pair(s) not compared: a row has no per-image hits (made before rows recorded them)."


def test_report_warns_where_real_rows_calibrate_inside_the_jpeg_eval_set():
    """CIFAR's real calibration slice is part of JPEG-10k: the report says so wherever a real row shows that figure."""
    from zsq.bench.report import _calib_overlap_lines

    real = {"model": "cifar10_resnet20", "data": "real", "jpeg": {"top1": 80.0}}
    caveat = _calib_overlap_lines([real, {"model": "cifar10_resnet20", "data": "genie", "jpeg": {"top1": 79.0}}])
    assert len(caveat) == 1 and "JPEG-10k[1017:2041]" in caveat[0] and "own calibration images" in caveat[0]
    assert _calib_overlap_lines([dict(real, jpeg=None)]) == []  # no JPEG figure shown: nothing to warn of
    assert _calib_overlap_lines([{"model": "efficientnet_lite0", "data": "real", "jpeg": None}]) == []
