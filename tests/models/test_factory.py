"""A user's own model on the command line: `zsq quantize path/to/file.py:build_fn` (issue 42)."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zsq.cli import main
from zsq.errors import ZsqError
from zsq.models import load
from zsq.models.factory import is_factory_spec

ASSET = Path(__file__).resolve().parents[1] / "assets" / "my_net.py"
META = ["--input-size", "3,32,32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


def _weights(tmp_path: Path) -> Path:
    """Trained-looking weights for my_net.build, saved by the test (BN statistics away from their init)."""
    sys.path.insert(0, str(ASSET.parent))
    try:
        import my_net
    finally:
        sys.path.remove(str(ASSET.parent))
    g = torch.Generator().manual_seed(0)
    model = my_net.build()
    sd = {k: (torch.randn(v.shape, generator=g) * 0.3 if v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    path = tmp_path / "weights.pt"
    torch.save(sd, path)
    return path


def _images(tmp_path: Path, n: int = 24) -> Path:
    g = np.random.default_rng(0)
    path = tmp_path / "val.npz"
    np.savez(path, x=g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=g.integers(0, 10, n))
    return path


def _run(capsys, *argv) -> dict:
    rc = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out) if captured.out.strip() else {}


def test_spec_forms():
    assert is_factory_spec("tests/assets/my_net.py:build") and is_factory_spec("my_pkg.models:build")
    assert is_factory_spec("net.py:build")
    for name in ("timm:resnet18", "torchvision:resnet18", "pytorchcv:resnet20_cifar10", "cifar10_resnet20"):
        assert not is_factory_spec(name)


def test_quantize_evaluate_export_inspect_end_to_end(capsys, tmp_path, monkeypatch):
    weights, val = _weights(tmp_path), _images(tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative file path, as a user types it
    local = tmp_path / "src" / "my_net.py"
    local.parent.mkdir()
    shutil.copy(ASSET, local)
    spec = "src/my_net.py:build"

    ev = _run(capsys, "evaluate", spec, "--weights", str(weights), *META, "--data", str(val))
    fp = load(str(local) + ":build", weights=weights, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        from zsq.data import load_images_tensor

        x, y = load_images_tensor(str(val), fp.zsq_meta)
        want = float((fp(x).argmax(1) == y).float().mean())
    assert ev["n"] == 24 and ev["top1"] == pytest.approx(want)

    q = _run(capsys, "quantize", spec, "--weights", str(weights), *META, "--method", "bn-minmax", "--bits", "w8a8",
             "--out", "q", "--eval-data", str(val))
    assert q["model"] == f"{local.resolve()}:build"  # what the checkpoint rebuilds from, absolute
    assert q["fp32_top1"] == pytest.approx(want)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["model_name"] == f"{local.resolve()}:build"
    saved_meta = json.loads((tmp_path / "q" / "quant.json").read_text())["meta"]
    assert saved_meta["input_size"] == [3, 32, 32] and saved_meta["mean"] == [0.5] * 3
    assert saved_meta["num_classes"] == 10 and len(saved_meta["extra"]["factory_sha256"]) == 64

    pytest.importorskip("onnxruntime", reason="onnxruntime (the optional 'onnx' extra) is not installed")
    monkeypatch.chdir(tmp_path / "src")  # the checkpoint rebuilds from anywhere
    ex = _run(capsys, "export", str(tmp_path / "q"), "--onnx", str(tmp_path / "q.onnx"), "--latency-runs", "0",
              "--num-check", "64")
    assert ex["model"] == f"{local.resolve()}:build" and (tmp_path / "q.onnx").stat().st_size > 0
    assert ex["top1_agreement"] >= 0.95

    monkeypatch.chdir(tmp_path)
    plan = _run(capsys, "inspect", spec, *META, "--preset", "genie", "--bits", "w4a4")
    assert [r["layer"] for r in plan["layers"]] == ["features.0", "features.3", "head"]


def test_a_package_module_factory(capsys, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ASSET.parent))
    plan = _run(capsys, "inspect", "my_net:build", *META)
    assert len(plan["layers"]) == 3


@pytest.mark.parametrize("spec,needle", [
    ("{dir}/nope.py:build", "model factory file not found: .*nope.py"),
    ("{dir}/my_net.py:biuld", "has no 'biuld'; did you mean build"),
    ("{dir}/my_net.py:NOT_CALLABLE", "NOT_CALLABLE is a int, not a callable"),
    ("{dir}/my_net.py:not_a_module", "returned a dict, not a torch.nn.Module"),
    ("{dir}/my_net.py:broken", "raised RuntimeError: cannot build on Tuesdays"),
    ("no_such_pkg_zsq.models:build", "module 'no_such_pkg_zsq.models' not found"),
])
def test_bad_factory_strings_are_one_line_errors(capsys, tmp_path, spec, needle):
    import re

    rc = main(["quantize", spec.format(dir=ASSET.parent), "--random-init", *META, "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("zsq: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(needle, err), err
    assert not (tmp_path / "q").exists()


def test_metadata_is_required_and_checked(capsys, tmp_path):
    spec = f"{ASSET}:build"
    with pytest.raises(ZsqError, match="carries no zsq metadata: give --mean, --std"):
        load(spec, input_size="3,32,32")
    with pytest.raises(ZsqError, match="--num-classes 7 but model .* outputs 10 classes"):
        load(spec, input_size="3,32,32", mean="0.5,0.5,0.5", std="0.2,0.2,0.2", num_classes=7)
    with pytest.raises(ZsqError, match="--mean needs 3 values"):
        load(spec, input_size="3,32,32", mean="0.5,0.5", std="0.2,0.2,0.2")
    with pytest.raises(ZsqError, match="--input-size must be three whole numbers"):
        load(spec, input_size="3,32,0", mean="0.5,0.5,0.5", std="0.2,0.2,0.2")
    with pytest.raises(ZsqError, match="apply to a model factory"):
        load("cifar10_resnet20", input_size=(3, 32, 32))
    m = load(spec, input_size="3,32,32", mean="0.5,0.5,0.5", std="0.2,0.2,0.2")
    assert m.zsq_meta.num_classes == 10 and m.zsq_meta.input_size == (3, 32, 32)
