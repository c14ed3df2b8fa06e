"""Bad input, as a hostile but fair user gives it (issue 12): every case is exit code 2, exactly one
line on stderr, no traceback, and no file that zsq did not create is changed."""
import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zsq
from zsq.cli import main
from zsq.errors import ZsqError

R20 = "cifar10_resnet20"


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, *argv, needle: str) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("zsq: error:"), err
    assert "Traceback" not in err and out == ""
    assert needle in lines[0], lines[0]
    return lines[0]


def quantize_ok(capsys, *argv):
    code = main(["quantize", R20, "--random-init", "--quiet", "--json", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def data_npz(tmp_path):
    p = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(p, x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 8))
    return p


def _set(tmp_path, images, name="set"):
    """A SyntheticSet folder written by hand (SyntheticSet.save refuses non-finite images)."""
    from safetensors.torch import save_file

    d = tmp_path / name
    d.mkdir()
    save_file({"images": images}, str(d / "images.safetensors"))
    (d / "meta.json").write_text(json.dumps({"method": "noise", "num_images": images.shape[0]}))
    return d


# ---- code execution --------------------------------------------------------------------------------
class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("name", ["work/ptq_state.pt", "work/ptq_state.safetensors", "work/qat_state.safetensors"])
def test_crafted_pickle_in_a_run_folder_never_runs(capsys, tmp_path, name):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_bytes(pickle.dumps({"state": _Marker(marker)}))
    before = snapshot(tmp_path)
    refused(capsys, "quantize", R20, "--random-init", "--method", "genie", "--out", out, "--resume",
            needle="holds no zsq run")
    assert not marker.exists() and snapshot(tmp_path) == before


def test_crafted_pickle_as_weights_never_runs(capsys, tmp_path, data_npz):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"conv1.weight": _Marker(marker)}))
    refused(capsys, "evaluate", R20, "--weights", tmp_path / "evil.pth", "--data", data_npz, needle="evil.pth")
    assert not marker.exists()


# ---- deleting user files ---------------------------------------------------------------------------
def test_force_never_removes_a_work_folder_zsq_did_not_make(capsys, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("mine")
    before = snapshot(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        refused(capsys, "quantize", R20, "--random-init", "--out", ".", "--force", needle="was not made by zsq")
    finally:
        os.chdir(cwd)
    assert snapshot(tmp_path) == before


def test_force_keeps_the_synthetic_set_it_calibrates_on(capsys, tmp_path):
    out = tmp_path / "o"
    quantize_ok(capsys, "--method", "minmax", "--synth", "noise", "--num-images", "8", "--bits", "w8a8", "--out", out)
    kept = snapshot(out / "synth")
    rep = quantize_ok(capsys, "--method", "minmax", "--calib-data", out / "synth", "--bits", "w8a8", "--out", out,
                      "--force")
    assert rep["calib_source"].startswith("synthetic:noise") and snapshot(out / "synth") == kept


def test_force_removes_only_what_zsq_made(capsys, tmp_path):
    out = tmp_path / "o"
    quantize_ok(capsys, "--out", out)
    (out / "notes.txt").write_text("mine")
    (out / "work").mkdir(exist_ok=True)
    quantize_ok(capsys, "--out", out, "--force", "--bits", "w8a8")
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text())["bits"] == "w8a8"
    assert "notes.txt" not in json.loads((out / ".zsq-run.json").read_text())["created"]


# ---- silent wrong models ---------------------------------------------------------------------------
@pytest.mark.parametrize("model", [R20, "torchvision:resnet18"])
def test_a_model_without_weights_is_refused(capsys, tmp_path, model):
    refused(capsys, "quantize", model, "--out", tmp_path / "o", needle="--random-init")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ZsqError, match="random_init=True"):
        zsq.quantize(model, out=None)


def test_one_nan_pixel_in_a_synthetic_set_is_refused(capsys, tmp_path):
    x = torch.randn(8, 3, 32, 32)
    x[3, 1, 5, 7] = float("nan")
    d = _set(tmp_path, x)
    before = snapshot(tmp_path)
    refused(capsys, "quantize", R20, "--random-init", "--method", "minmax", "--calib-data", d,
            "--out", tmp_path / "o", needle="NaN or inf")
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_nan_weights_are_refused(capsys, tmp_path, data_npz):
    sd = zsq.models.load(R20).state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.th")
    refused(capsys, "evaluate", R20, "--weights", tmp_path / "nan.th", "--data", data_npz,
            needle="'layer1.0.conv1.weight'")


def test_parity_cannot_pass_on_nan(tmp_path):
    from zsq.export import parity

    class NaNModel(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 10), float("nan"))

    orig = parity.run_ort
    parity.run_ort = lambda session, images, batch_size=64: np.full((images.shape[0], 10), np.nan, np.float32)
    try:
        with pytest.raises(ZsqError, match="zsq model gives NaN or inf logits"):  # before any ONNX file is read
            parity.check_parity(NaNModel(), tmp_path / "none.onnx", torch.zeros(4, 3, 8, 8))
    finally:
        parity.run_ort = orig


def test_nan_in_a_result_is_never_written(tmp_path):
    model = zsq.models.load(R20)
    q = zsq.quantize_model(model, zsq.get_preset("genie", "w4a4"))
    zsq.quant.calibrate_from_bn(q)
    with torch.no_grad():
        q.linear.bias[0] = float("nan")
    with pytest.raises(ZsqError, match="NaN or inf.*linear.bias"):
        zsq.export.save_quantized(q, tmp_path / "ck", model_name=R20)
    assert not (tmp_path / "ck").exists()


def test_json_output_is_always_valid(capsys, monkeypatch):
    import zsq.cli as cli

    monkeypatch.setattr(cli, "cmd_methods", lambda args: {"loss": float("nan")})
    code = main(["methods", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "non-finite values (loss)" in err


def test_resume_of_a_finished_run_with_other_bits_is_refused(capsys, tmp_path):
    out = tmp_path / "o"
    quantize_ok(capsys, "--out", out)
    before = snapshot(out)
    refused(capsys, "quantize", R20, "--random-init", "--out", out, "--resume", "--bits", "w8a8",
            needle="bits (checkpoint: 'w4a4', now: 'w8a8')")
    refused(capsys, "quantize", R20, "--random-init", "--out", out, "--resume", "--method", "minmax",
            "--synth", "noise", needle="method (checkpoint: 'bn-minmax', now: 'minmax')")
    assert snapshot(out) == before


def test_an_uncalibrated_model_refuses_to_evaluate():
    q = zsq.quantize_model(zsq.models.load(R20), zsq.get_preset("genie", "w4a4"))
    x, y = torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ZsqError, match="not calibrated"):
        zsq.evaluate(q, (x, y))
    zsq.quant.calibrate_from_bn(q)
    assert zsq.evaluate(q, (x, y))["n"] == 4


# ---- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,item,needle", [
    ("genie", "nope=1", "genie has no option nope; its options are: chunk (int), max_cache_mib (float), work_dir"),
    ("genie", "chunk=0", "chunk must be >= 1, got 0"),
    ("bn-minmax", "bn_k=-3", "bn_k must be > 0.0 and <= 64.0, got -3"),
    ("bn-minmax", "bn_k=abc", "bn_k must be a finite number, got 'abc'"),
    ("bn-minmax", "bn_kk=3", "bn-minmax has no option bn_kk; its options are: bn_k (float)"),
    ("minmax", "x=1", "method minmax takes no options"),
    ("gdfq", "lr=fast", "lr must be a finite number, got 'fast'"),
    ("gdfq", "lrr=1", "gdfq has no option lrr"),
])
def test_bad_set_options_list_the_valid_ones(capsys, tmp_path, method, item, needle):
    refused(capsys, "quantize", R20, "--random-init", "--method", method, "--synth", "noise", "--set", item,
            "--out", tmp_path / "o", needle=needle)
    assert not (tmp_path / "o").exists()


def test_set_options_reach_the_report(capsys, tmp_path):
    rep = quantize_ok(capsys, "--set", "bn_k=3", "--out", tmp_path / "o")
    assert rep["options"] == {"bn_k": 3.0} and rep["method_report"]["bn_k"] == 3.0


# ---- paths and files -------------------------------------------------------------------------------
def test_synthesize_out_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("mine")
    refused(capsys, "synthesize", R20, "--random-init", "--method", "noise", "--num-images", "4",
            "--out", tmp_path / "f", needle="is not a directory")
    assert (tmp_path / "f").read_text() == "mine"


def test_an_out_below_a_file_is_refused_before_work(capsys, tmp_path):
    (tmp_path / "f").write_text("mine")
    refused(capsys, "quantize", R20, "--random-init", "--out", tmp_path / "f" / "o", needle="is not a directory")


def test_export_onnx_dir(capsys, tmp_path):
    (tmp_path / "d").mkdir()
    refused(capsys, "export", tmp_path / "ck", "--onnx", tmp_path / "d", "--force", needle="is a directory")


@pytest.mark.parametrize("damage", ["images", "meta"])
def test_truncated_calibration_set(capsys, tmp_path, damage):
    d = _set(tmp_path, torch.randn(4, 3, 32, 32))
    f = d / ("images.safetensors" if damage == "images" else "meta.json")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    refused(capsys, "quantize", R20, "--random-init", "--method", "minmax", "--calib-data", d,
            "--out", tmp_path / "o", needle=f.name)


def test_truncated_run_state_on_resume(capsys, tmp_path, monkeypatch):
    from zsq.synth.genie import GenieSynthesizer

    original = GenieSynthesizer.make_batch

    def crash(self, ctx, index, size, gen):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, ctx, index, size, gen)

    monkeypatch.setattr(GenieSynthesizer, "make_batch", crash)
    argv = ["synthesize", R20, "--random-init", "--method", "genie", "--num-images", "4", "--batch-size", "2",
            "--iters", "1", "--out", tmp_path / "s", "--quiet"]
    assert main([str(a) for a in argv]) == 130
    capsys.readouterr()
    monkeypatch.setattr(GenieSynthesizer, "make_batch", original)
    f = tmp_path / "s" / "ckpt" / "batch_00000.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    refused(capsys, *argv, "--resume", needle="batch_00000.safetensors is damaged")


@pytest.mark.parametrize("command,module,extra", [("bench", "matplotlib", "plots"), ("export", "onnx", "onnx")])
def test_missing_optional_dependency_names_the_extra(capsys, tmp_path, monkeypatch, command, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    argv = {"bench": ["bench", "--suite", "cifar10-resnet20", "--out", tmp_path / "b"],
            "export": ["export", tmp_path / "ck", "--onnx", tmp_path / "m.onnx"]}[command]
    refused(capsys, *argv, needle=f"pip install 'zsq[{extra}]'")
    assert not any(tmp_path.iterdir())
