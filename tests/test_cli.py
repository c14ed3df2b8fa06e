"""The CLI: one-line errors with exit code 2 and nothing written; JSON output keys."""
import json

import pytest
import torch

from zsq.assets import CIFAR10_EXACT, RESNET20
from zsq.cli import main
from tests.conftest import need_asset


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, needle):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("zsq: error:"), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_unknown_model(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", "cifar10_resnet21", "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "cifar10_resnet21")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bits,needle", [("w9a4", "weight bits"), ("w4a1", "activation bits"), ("4bit", "malformed")])
def test_bad_bits(capsys, tmp_path, bits, needle):
    code, _, err = run(capsys, "quantize", "cifar10_resnet20", "--bits", bits, "--out", str(tmp_path / "o"))
    _one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_missing_weights(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", "cifar10_resnet20", "--weights", str(tmp_path / "nope.th"),
                       "--data", str(tmp_path / "x.npz"))
    _one_line_error(code, err, "nope.th")


def test_mismatching_checkpoint_names_the_key(capsys, tmp_path):
    bad = tmp_path / "bad.th"
    torch.save({"conv1.weight": torch.zeros(16, 3, 5, 5)}, bad)
    code, _, err = run(capsys, "evaluate", "cifar10_resnet20", "--weights", str(bad), "--data", "x.npz")
    _one_line_error(code, err, "conv1.weight")


def test_non_empty_out_dir_is_refused(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", "cifar10_resnet20", "--out", str(out))
    _one_line_error(code, err, "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unknown_method(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", "cifar10_resnet20", "--method", "magic", "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "unknown method 'magic'")


def test_data_that_cannot_fit_the_model(capsys, tmp_path):
    import numpy as np

    p = tmp_path / "small.npz"
    np.savez(p, x=np.zeros((4, 16, 16, 3), np.uint8), y=np.zeros(4, np.int64))
    code, _, err = run(capsys, "evaluate", "cifar10_resnet20", "--random-init", "--data", str(p))
    _one_line_error(code, err, "16")


def test_methods_json(capsys):
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0
    d = json.loads(out)
    assert "bn-minmax" in d["methods"] and {"genie", "gdfq"} <= set(d["presets"])
    assert d["methods"]["bn-minmax"]["needs_images"] is False


def test_quantize_bn_minmax_end_to_end(capsys, tmp_path):
    weights = str(need_asset(RESNET20))
    data = str(need_asset(CIFAR10_EXACT))
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", "cifar10_resnet20", "--weights", weights, "--method", "bn-minmax",
                            "--bits", "w8a8", "--out", str(out), "--eval-data", data, "--json", "--quiet")
    assert code == 0, err
    rep = json.loads(stdout)
    for key in ("fp32_top1", "quant_top1", "n", "seconds", "method", "bits", "preset"):
        assert key in rep
    assert rep["n"] == 1017 and rep["bits"] == "w8a8" and rep["preset"] == "genie"
    assert abs(rep["quant_top1"] - rep["fp32_top1"]) <= 1.0
    assert (out / "manifest.json").exists()
    # the saved model reloads to the same accuracy
    import zsq

    again = zsq.evaluate(zsq.load_quantized(out), data)["top1"]
    assert again == pytest.approx(rep["quant_top1"])


def test_force_starts_over_in_a_used_out_dir(capsys, tmp_path):
    """`make demo` twice: --force must replace the earlier run's synthetic set and work state, not
    refuse it as a foreign synthesis run; files that are not zsq's are left alone."""
    weights = str(need_asset(RESNET20))
    out = tmp_path / "o"
    argv = ["quantize", "cifar10_resnet20", "--weights", weights, "--method", "minmax", "--synth", "noise",
            "--num-images", "16", "--bits", "w8a8", "--out", str(out), "--json", "--quiet"]
    assert run(capsys, *argv)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, *argv)
    _one_line_error(code, err, "not empty")
    code, stdout, err = run(capsys, *argv, "--force", "--seed", "1")
    assert code == 0, err
    assert json.loads(stdout)["num_images"] == 16
    assert (out / "notes.txt").read_text() == "mine"
    meta = json.loads((out / "synth" / "meta.json").read_text())
    assert meta["seed"] == 1  # the set was made again, not reused
