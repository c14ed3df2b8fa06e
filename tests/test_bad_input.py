"""Bad input, as a hostile but fair user gives it (issue 12): every case is exit code 2, exactly one
line on stderr, no traceback, and no file that zsq did not create is changed."""
import hashlib
import json
import os
import pickle
import shutil
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


def tree(root: Path) -> dict:
    """Every entry below root, links not followed: a file by its sha256, a folder, link or other by its kind."""
    def kind(p):
        if p.is_symlink():
            return "link:" + os.readlink(p)
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
        return "dir" if p.is_dir() else "other"
    return {str(p.relative_to(root)): kind(p) for p in sorted(root.rglob("*"))}


def _around(argv) -> list:
    """The folders holding every path named on the command line (OUT's parent, the checkpoint's, the data's):
    a refused command changes no file in any of them, not only none in OUT."""
    import tempfile

    tmp = Path(tempfile.gettempdir()).resolve()
    dirs = {Path(a).resolve().parent for a in argv if isinstance(a, Path)}
    dirs = {d for d in dirs if tmp in d.parents and d.is_dir()}
    return sorted(d for d in dirs if not any(o in d.parents for o in dirs))


def refused(capsys, *argv, needle: str, changes_nothing: bool = True) -> str:
    """``changes_nothing=False``: a failure during the work, whose run folder stays for --resume."""
    roots = _around(argv) if changes_nothing else []
    before = [tree(r) for r in roots]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert [tree(r) for r in roots] == before, f"a refused command changed files around {roots}"
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
GENIE_FAST = ["--method", "genie", "--synth", "noise", "--num-images", "8", "--iters", "1", "--batch-size", "8"]


def record(out: Path) -> dict:
    return json.loads((out / ".zsq-run.json").read_text())


def test_force_never_removes_a_work_folder_zsq_did_not_make(capsys, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("mine")
    before = snapshot(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # genie keeps its resume state in OUT/work: that name is the user's, so the run is refused
        refused(capsys, "quantize", R20, "--random-init", *GENIE_FAST, "--out", ".", "--force",
                needle="was not made by zsq")
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
    assert set(record(out)["entries"]) == {"manifest.json", "packed_weights.safetensors", "float_state.safetensors",
                                           "quant.json", "report.md"}  # bn-minmax makes no work/ (nor report/)
    (out / "notes.txt").write_text("mine")
    (out / "work").mkdir()  # a bn-minmax run never made one: the user's
    (out / "work" / "notes.txt").write_text("mine too")
    quantize_ok(capsys, "--out", out, "--force", "--bits", "w8a8")
    assert (out / "notes.txt").read_text() == "mine" and (out / "work" / "notes.txt").read_text() == "mine too"
    assert json.loads((out / "manifest.json").read_text())["bits"] == "w8a8"
    assert not {"notes.txt", "work"} & set(record(out)["entries"])


def test_force_never_removes_a_byte_zsq_did_not_write(capsys, tmp_path):
    """User files planted under every name a run uses (in OUT, in its work/ and synth/), zsq's files replaced
    by the user's, and an edited record: --force removes none of them."""
    out = tmp_path / "o"
    quantize_ok(capsys, *GENIE_FAST, "--out", out)
    names = set(record(out)["entries"])
    assert {"manifest.json", "quant.json", "work", "synth"} <= names
    # beside zsq's files, inside its folders, and an edited record that lists them (with made-up identities)
    planted = {out / "notes.txt": "a", out / "work" / "notes.txt": "b", out / "synth" / "mine.png": "c",
               out / "synth" / "ckpt" / "keep.json": "d"}
    for f, text in planted.items():
        f.write_text(text)
    rec = record(out)
    rec["entries"]["notes.txt"] = {"type": "file", "size": 1, "ino": 1, "mtime_ns": 1}
    (out / ".zsq-run.json").write_text(json.dumps(rec))
    quantize_ok(capsys, *GENIE_FAST, "--out", out, "--force", "--seed", "1")
    # a record claiming a user's file in zsq's folder (identity made up): a run would write that name again,
    # so the file is treated as one of zsq's that was replaced, and --force refuses, changing nothing
    rec = record(out)
    rec["entries"]["work"]["files"]["notes.txt"] = {"type": "file", "size": 1, "ino": 1, "mtime_ns": 1}
    (out / ".zsq-run.json").write_text(json.dumps(rec))
    refused(capsys, "quantize", R20, "--random-init", *GENIE_FAST, "--out", out, "--force",
            needle="work/notes.txt was changed since zsq wrote it")
    del rec["entries"]["work"]["files"]["notes.txt"]
    (out / ".zsq-run.json").write_text(json.dumps(rec))
    assert all(f.read_text() == text for f, text in planted.items())
    assert (out / "work" / "ptq_state.safetensors").exists() and (out / "synth" / "images.safetensors").exists()
    # every name zsq uses, one at a time: the code's list of entries and every file the run wrote below OUT
    # (and its record and lock), each replaced by the user's bytes (a folder by the user's folder); --force
    # refuses and changes nothing, then zsq's entry is put back (a rename keeps what identifies it)
    for name in _zsq_names(out):
        p, moved = out / name, tmp_path / "zsq-original"
        if p.exists():
            p.rename(moved)
        p.parent.mkdir(parents=True, exist_ok=True)
        if name in _dir_names():
            p.mkdir()
            (p / "ptq_state.safetensors").write_text("the user's")
        else:
            p.write_text("the user's")
        before = snapshot(tmp_path)
        refused(capsys, "quantize", R20, "--random-init", *GENIE_FAST, "--out", out, "--force",
                needle=name.split("/")[-1])
        assert snapshot(tmp_path) == before, name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        if moved.exists():
            moved.rename(p)
    quantize_ok(capsys, *GENIE_FAST, "--out", out, "--force", "--seed", "2")  # all put back: zsq's again
    assert all(f.read_text() == text for f, text in planted.items())


def _dir_names() -> tuple:
    from zsq.run import run_dirs
    from zsq.run_report import REPORT_DIR

    return run_dirs(True, "ptq") + run_dirs(True, "qat") + (REPORT_DIR,)


def _zsq_names(out: Path) -> list:
    """Every name zsq writes in OUT, derived from the code and from what a run wrote, not a hand list."""
    from zsq.run import run_names
    from zsq.runlock import LOCK_FILE
    from zsq.runstate import RUN_FILE

    names = set(run_names(True, "ptq")) | set(run_names(True, "qat")) | {RUN_FILE, LOCK_FILE}
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith("notes")}
    names |= {n for n in written if not n.endswith(("mine.png", "keep.json"))}
    assert {"manifest.json", "work/ptq_state.safetensors", "synth/images.safetensors"} <= names
    return sorted(names)


def test_an_edited_record_cannot_make_force_remove_anything(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    (out / ".zsq-run.json").write_text(json.dumps({"created": ["thesis.tex", "../x"], "fingerprint": None}))
    quantize_ok(capsys, "--out", out, "--force")  # an old-style record without identities owns nothing
    assert (out / "thesis.tex").read_text() == "mine"


def test_force_after_a_killed_run_removes_its_files_only(capsys, tmp_path, monkeypatch):
    """A run killed during synthesis recorded none of its batch files: --force removes zsq's own state files
    (they say so themselves) and keeps a file the user put there since."""
    from zsq.synth.genie import GenieSynthesizer

    original = GenieSynthesizer.make_batch

    def crash(self, ctx, index, size, gen):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, ctx, index, size, gen)

    out = tmp_path / "o"
    monkeypatch.setattr(GenieSynthesizer, "make_batch", crash)
    argv = ["quantize", R20, "--random-init", "--method", "genie", "--num-images", "256", "--iters", "1",
            "--out", out, "--quiet"]  # several synthesis batches: the second one is killed
    assert main([str(a) for a in argv]) == 130
    capsys.readouterr()
    monkeypatch.setattr(GenieSynthesizer, "make_batch", original)
    assert (out / "synth" / "ckpt" / "batch_00000.safetensors").exists()
    (out / "synth" / "ckpt" / "notes.txt").write_text("mine")
    quantize_ok(capsys, "--method", "minmax", "--synth", "noise", "--num-images", "8", "--out", out, "--force")
    assert (out / "synth" / "ckpt" / "notes.txt").read_text() == "mine"
    assert not (out / "synth" / "ckpt" / "batch_00000.safetensors").exists()
    assert not (out / "work").exists()  # minmax needs none; the killed run's empty one was zsq's


def test_no_option_moves_state_out_of_out(capsys, tmp_path):
    before = snapshot(tmp_path)
    refused(capsys, "quantize", R20, "--random-init", *GENIE_FAST, "--set", f"work_dir={tmp_path / 'elsewhere'}",
            "--out", tmp_path / "o", needle="work_dir: with --out the run state lives in")
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists() and not (tmp_path / "elsewhere").exists()


# ---- one run per folder ----------------------------------------------------------------------------
def test_a_second_run_on_a_locked_folder_is_refused(capsys, tmp_path):
    import socket

    from zsq.runlock import RunLock

    out = tmp_path / "o"
    out.mkdir()
    with RunLock(out):
        before = snapshot(tmp_path)
        line = refused(capsys, "quantize", R20, "--random-init", "--out", out, "--force", needle="is in use by another")
        assert f"pid {os.getpid()} on {socket.gethostname()}" in line and snapshot(tmp_path) == before
        refused(capsys, "bench", "--suite", "cifar10-resnet20", "--out", out, "--report-only", needle="is in use")
    quantize_ok(capsys, "--out", out, "--force")  # released: the folder is free again
    assert not (out / ".zsq-lock").exists()


def test_a_stale_lock_is_taken_over_with_a_log_line(capsys, tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    out.mkdir()
    (out / ".zsq-lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    code = main(["quantize", R20, "--random-init", "--out", str(out), "--force"])
    _, err = capsys.readouterr()
    assert code == 0 and f"taking over the stale lock {out / '.zsq-lock'} of pid {dead.pid}" in err
    assert not (out / ".zsq-lock").exists()


def test_a_failed_run_lets_the_folder_go(capsys, tmp_path, monkeypatch):
    import zsq.run as zrun

    out = tmp_path / "o"
    monkeypatch.setattr(zrun, "_quant_accuracy", lambda *a: (_ for _ in ()).throw(ZsqError("boom")))
    monkeypatch.setattr(zrun, "STEPS", tuple((n, zrun._quant_accuracy if n == "quantized accuracy" else f)
                                             for n, f in zrun.STEPS))
    refused(capsys, "quantize", R20, "--random-init", "--quiet", "--out", out, needle="boom", changes_nothing=False)
    monkeypatch.undo()
    assert not (out / ".zsq-lock").exists()
    quantize_ok(capsys, "--out", out, "--resume")


# ---- named output files ----------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["quantize", R20, "--random-init", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def test_export_never_writes_over_an_input_or_a_non_regular_file(capsys, tmp_path, checkpoint, data_npz):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.onnx"
    link.symlink_to(tmp_path / "target.onnx")
    (tmp_path / "notes.onnx").write_text("not an onnx model")
    cases = [(checkpoint / "manifest.json", [], "is an input of this command"),
             (checkpoint / "new.onnx", [], "is an input of this command"),
             (data_npz, ["--check-data", f"{data_npz}[0:4]"], "is an input of this command"),
             (fifo, [], "is not a regular file"), (link, [], "is a symbolic link"),
             (tmp_path / "notes.onnx", [], "is not a file zsq writes")]
    if os.geteuid() == 0:  # a character device like /dev/null, made where the test may
        dev = tmp_path / "null"
        os.mknod(dev, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))
        cases.append((dev, [], "is not a regular file"))
    before = snapshot(tmp_path)
    for target, extra, needle in cases:
        refused(capsys, "export", checkpoint, "--onnx", target, "--force", *extra, needle=needle)
    assert snapshot(tmp_path) == before and not (tmp_path / "target.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith("partial")) == []


def test_export_force_replaces_an_onnx_file_and_leaves_no_temp_file(capsys, tmp_path, checkpoint):
    pytest.importorskip("onnxruntime")
    target = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.partial").write_text("mine")  # the name older versions used for their temp file
    for force in ([], ["--force"]):
        assert main(["export", str(checkpoint), "--onnx", str(target), "--num-check", "8", "--latency-runs", "0",
                     "--quiet", *force]) == 0
    capsys.readouterr()
    assert (tmp_path / "m.onnx.partial").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "m.onnx", "m.onnx.partial"]


# ---- bounds and contradictions, before any work or process -----------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["quantize", R20, "--random-init", "--workers", "2", "--bits", "w9a9"], "w9a9"),
    (["quantize", R20, "--random-init", "--workers", "100000"], "--workers must be >= 1 and <= "),
    (["quantize", R20, "--random-init", "--workers", "0"], "--workers must be >= 1"),
    (["quantize", R20, "--random-init", "--workers", "2", "--method", "genie", "--set", "augment=1000000000"],
     "augment must be >= 0 and <= 64, got 1000000000"),
    (["quantize", R20, "--random-init", "--method", "genie", "--set", "holdout=-1"], "holdout must be in [0, 1)"),
    (["quantize", R20, "--random-init", "--method", "genie", "--set", "max_cache_mib=1e12"], "max_cache_mib must be"),
    (["quantize", R20, "--random-init", "--method", "genie", "--set", "chunk=100000000"], "chunk must be"),
    (["quantize", R20, "--random-init", "--num-images", "0"], "--num-images must be an integer from 1"),
    (["quantize", R20, "--random-init", "--num-images", "100000000"], "--num-images must be an integer from 1"),
    (["quantize", R20, "--random-init", "--batch-size", "-1"], "--batch-size must be"),
    (["quantize", R20, "--random-init", "--iters", "0"], "--iters must be"),
    (["quantize", R20, "--random-init", "--seed", "-1"], "--seed must be"),
    (["quantize", R20, "--pretrained", "--weights", "w.pt"], "not both"),
    (["quantize", R20, "--pretrained", "--random-init"], "cannot be combined with --pretrained"),
    (["quantize", R20, "--weights", "w.pt", "--random-init"], "cannot be combined with --weights"),
    (["quantize", R20, "--random-init", "--resume", "--force"], "give one of them"),
    (["synthesize", R20, "--random-init", "--method", "noise", "--num-images", "-4"], "--num-images must be"),
    (["export", "ck", "--onnx", "m.onnx", "--threads", "-1"], "--threads must be an integer from 1"),
    (["export", "ck", "--onnx", "m.onnx", "--latency-runs", "-1"], "--latency-runs must be an integer from 0"),
    (["export", "ck", "--onnx", "m.onnx", "--num-check", "0"], "--num-check must be an integer from 1"),
    (["bench", "--suite", "cifar10-resnet20", "--cell-timeout", "-1"], "--cell-timeout must be > 0.0"),
])
def test_out_of_range_and_contradictory_arguments_before_any_work(capsys, tmp_path, monkeypatch, argv, needle):
    import zsq.distributed as zdist

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(zdist, "launch_workers", lambda *a: pytest.fail("processes started before the check"))
    pytest.importorskip("onnx") if argv[0] == "export" else None
    refused(capsys, *argv, "--out" if argv[0] != "export" else "--quiet", *(["o"] if argv[0] != "export" else []),
            needle=needle)
    assert list(tmp_path.iterdir()) == []


def test_api_checks_its_numbers_and_flags(tmp_path):
    src = zsq.ModelSource(R20, random_init=True)
    with pytest.raises(ZsqError, match="--num-images must be an integer from 1"):
        zsq.quantize(src, calibration=zsq.Calibration(synth="noise", num_images=-3), out=tmp_path / "o")
    with pytest.raises(ZsqError, match="give one of them"):
        zsq.quantize(src, out=zsq.Output(tmp_path / "o", resume=True, force=True))
    with pytest.raises(ZsqError, match="--iters must be"):
        zsq.quantize(src, budget=zsq.RunBudget("quick", iters=0))
    with pytest.raises(ZsqError, match="--seed must be"):
        zsq.quantize(src, seed=-1)
    with pytest.raises(ZsqError, match="not both"):
        zsq.quantize(zsq.ModelSource(R20, pretrained=True, weights="w.pt"))
    assert not (tmp_path / "o").exists()


def test_an_augment_that_does_not_fit_is_refused_with_its_estimate(tmp_path):
    images = torch.randn(8, 3, 32, 32)
    with pytest.raises(ZsqError, match=r"reconstruction caches need \d+ MiB at most .*over the limit of 1 MiB"):
        zsq.quantize(zsq.ModelSource(R20, random_init=True), method="genie",
                     budget=zsq.RunBudget("quick", iters=1, batch_size=8),
                     options={"augment": 64, "max_cache_mib": 1},
                     calibration=zsq.Calibration(synth="noise", num_images=8))
    del images


# ---- failures while writing ------------------------------------------------------------------------
def test_bench_out_a_file_and_damaged_results(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "f").write_text("mine")
    refused(capsys, "bench", "--suite", "cifar10-resnet20", "--out", tmp_path / "f", needle="is not a directory")
    (tmp_path / "b").mkdir()
    for text, needle in (("{not json", "is damaged (not valid JSON"), ('["a"]', "not a zsq bench results file")):
        (tmp_path / "b" / "results.json").write_text(text)
        refused(capsys, "bench", "--suite", "cifar10-resnet20", "--out", tmp_path / "b", "--resume", needle=needle)
    (tmp_path / "b" / "results.json").unlink()
    (tmp_path / "b" / "results.json").mkdir()
    refused(capsys, "bench", "--suite", "cifar10-resnet20", "--out", tmp_path / "b", "--resume",
            needle="is not a regular file")
    assert (tmp_path / "f").read_text() == "mine"


def test_a_run_record_that_is_a_directory(capsys, tmp_path):
    out = tmp_path / "o"
    (out / ".zsq-run.json").mkdir(parents=True)
    refused(capsys, "quantize", R20, "--random-init", "--out", out, "--force", needle=".zsq-run.json is not a regular file")
    assert sorted(p.name for p in out.iterdir()) == [".zsq-run.json"]


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


@pytest.mark.parametrize("edit,needle", [
    (lambda d: _set_meta(d, num_images=20), "declares 20 images"),
    (lambda d: _set_tensors(d, labels=torch.tensor([0, 1, -3, 2, 0, 1, 2, 3])), "labels must be non-negative integer"),
    (lambda d: _set_tensors(d, labels=torch.zeros(8)), "labels must be non-negative integer"),
])
def test_a_synthetic_set_must_hold_what_it_declares(capsys, tmp_path, edit, needle):
    d = _set(tmp_path, torch.randn(8, 3, 32, 32))
    edit(d)
    before = snapshot(tmp_path)
    refused(capsys, "quantize", R20, "--random-init", "--method", "minmax", "--calib-data", d,
            "--out", tmp_path / "o", needle=needle)
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def _set_meta(d, **kw):
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps(dict(meta, **kw)))


def _set_tensors(d, **kw):
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "images.safetensors"))
    save_file(dict(t, **kw), str(d / "images.safetensors"))


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


def test_an_uncalibrated_model_refuses_a_plain_forward():
    """Its activation ranges would come from whatever batch it saw first: only an explicit context allows that."""
    from zsq.quant.state import lazy_init_allowed

    q = zsq.quantize_model(zsq.models.load(R20), zsq.get_preset("genie", "w4a4"))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ZsqError, match=r"not calibrated: activation quantizer \S+ has no range; run "
                                       r"zsq.quant.calibrate\(model, images\)") as err:
        q(x)
    assert "\n" not in str(err.value)
    assert not any(bool(a.initialized) for _, a in zsq.quant.act_quantizers(q) if not a.pinned)  # nothing set
    with lazy_init_allowed(q), torch.no_grad():  # on purpose: ranges from this batch, as before
        y = q(x)
    assert all(not a.lazy_init for _, a in zsq.quant.act_quantizers(q))  # the context puts the refusal back
    with torch.no_grad():
        assert torch.equal(q(x), y)  # now initialised: plain forwards run
    fresh = zsq.quantize_model(zsq.models.load(R20), zsq.get_preset("genie", "w4a4"))
    zsq.quant.calibrate(fresh, x)  # the ordinary calibration needs no context
    with torch.no_grad():
        fresh(x)


# ---- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,item,needle", [
    ("genie", "nope=1", "genie has no option nope; its options are: chunk (int), max_cache_mib (float), work_dir"),
    ("genie", "chunk=0", "chunk must be >= 1 and <= 65536, got 0"),
    ("bn-minmax", "bn_k=-3", "bn_k must be > 0.0 and <= 64.0, got -3"),
    ("bn-minmax", "bn_k=abc", "bn_k must be a finite number, got 'abc'"),
    ("bn-minmax", "bn_kk=3", "bn-minmax has no option bn_kk; its options are: equalize (bool), bias_correct (bool), "
                             "iterations (int), relu6 (clip|relu|skip), absorb (unpadded|all|none), bn_k (float)"),
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
    # the option given, over the schema's defaults (DFQ's options on bn-minmax stay off)
    assert rep["options"]["bn_k"] == 3.0 and rep["method_report"]["bn_k"] == 3.0
    assert rep["options"]["equalize"] is False and rep["options"]["bias_correct"] is False


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


def test_a_write_failure_is_one_line_and_the_run_stays_resumable(capsys, tmp_path, monkeypatch):
    import errno

    import zsq.export

    out = tmp_path / "o"

    def full(qmodel, out_dir, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "packed_weights.safetensors"))

    monkeypatch.setattr(zsq.export, "save_quantized", full)
    line = refused(capsys, "quantize", R20, "--random-init", "--quiet", "--out", out,
                   needle="No space left on device: ", changes_nothing=False)
    assert "packed_weights.safetensors" in line and "--resume" in line
    monkeypatch.undo()
    assert quantize_ok(capsys, "--out", out, "--resume")["bits"] == "w4a4"


def test_a_name_too_long_is_one_line(capsys, tmp_path):
    refused(capsys, "quantize", R20, "--random-init", "--out", tmp_path / ("a" * 4500), needle="File name too long")


@pytest.mark.parametrize("make", ["random", "pickle"])
def test_weights_of_random_bytes_never_advise_unsafe_loading(capsys, tmp_path, data_npz, make):
    f = tmp_path / "w.pt"
    f.write_bytes(os.urandom(4000) if make == "random" else b"\x80\x04" + pickle.dumps({"a": _Marker("x")})[2:])
    line = refused(capsys, "evaluate", R20, "--weights", f, "--data", data_npz, needle="cannot read weights file")
    assert "weights_only=False" not in line


# ---- exactly the data asked for --------------------------------------------------------------------
def test_calib_data_slices_a_synthetic_set(capsys, tmp_path):
    d = _set(tmp_path, torch.randn(16, 3, 32, 32))
    rep = quantize_ok(capsys, "--method", "minmax", "--calib-data", f"{d}[0:4]", "--out", tmp_path / "o")
    assert rep["num_images"] == 4
    rep = quantize_ok(capsys, "--method", "minmax", "--calib-data", f"{d}[10:]", "--num-images", "3",
                      "--out", tmp_path / "o2")
    assert rep["num_images"] == 3
    refused(capsys, "quantize", R20, "--random-init", "--method", "minmax", "--calib-data", f"{d}[20:30]",
            "--out", tmp_path / "o3", needle="selects no images")


def _png_folder(tmp_path, arrays, mode=None):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    rows = ["filename,label"]
    for i, a in enumerate(arrays):
        Image.fromarray(a, mode).save(d / f"{i}.png") if mode else Image.fromarray(a).save(d / f"{i}.png")
        rows.append(f"{i}.png,{i % 10}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d


def test_a_16_bit_png_is_read_as_its_values(tmp_path):
    from zsq.data import load_dataset

    from zsq.models.meta import ModelMeta

    meta = ModelMeta("m", 10, (3, 32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    grey16 = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # up to 61380 of 65535
    x, _ = load_dataset(_png_folder(tmp_path, [grey16]), meta)[0]
    want = torch.from_numpy(np.rint(grey16 / 257.0) / 255.0).float()
    assert torch.allclose(x[0], want, atol=1e-6) and torch.equal(x[0], x[2])  # not clipped to white
    assert float(x.max()) < 0.95


def test_an_image_of_another_size_in_a_folder_is_refused(capsys, tmp_path):
    a = np.zeros((32, 32, 3), np.uint8)
    b = np.zeros((36, 40, 3), np.uint8)
    d = _png_folder(tmp_path, [a, a, b])
    refused(capsys, "evaluate", R20, "--random-init", "--data", d, needle="every image must have one size")


def test_a_model_input_far_smaller_than_the_images_is_refused(tmp_path, data_npz):
    from zsq.models.meta import ModelMeta

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    zsq.models.set_meta(model, ModelMeta("tiny", 10, (3, 8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    with pytest.raises(ZsqError, match="centre crop would keep 6 % of each image"):
        zsq.evaluate(model, str(data_npz))


@pytest.mark.parametrize("row", ["../outside.png", "/etc/passwd", "sub/../../outside.png", "link/x.png"])
def test_labels_csv_rows_stay_inside_their_folder(capsys, tmp_path, row):
    from PIL import Image

    d = tmp_path / "set"
    d.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "outside.png")
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "elsewhere" / "x.png")
    (d / "link").symlink_to(tmp_path / "elsewhere")
    (d / "labels.csv").write_text(f"filename,label\n{row},1\n")
    refused(capsys, "evaluate", R20, "--random-init", "--data", d, needle="outside")


# ---- the API ---------------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self, returns="tensor"):
        super().__init__()
        self.returns = returns
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        y = self.fc(self.conv(x).mean((2, 3)))
        return {"tuple": (y, y), "dict": {"logits": y}, "tensor": y}[self.returns]


KW = dict(input_size=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.mark.parametrize("model,kw,needle", [
    (_Net("tuple"), KW, "returns a tuple; zsq quantizes classifiers"),
    (_Net("dict"), KW, "returns a dict"),
    (_Net().half(), KW, "float16 parameters; zsq quantizes float32 modules"),
    (_Net(), dict(KW, input_size=(32, 32)), "input_size must be (C, H, W)"),
    (_Net(), dict(input_size=(1, 8, 8), mean=(0.5,), std=(0.25,)), "fails on an input of input_size (1, 8, 8)"),
    (_Net(), dict(KW, std=(1.0, 0.0, 1.0)), "std must be 3 positive finite numbers"),
    (_Net(), dict(KW, mean=(0.5,)), "mean must be 3 finite numbers"),
])
def test_api_checks_the_module_it_is_given(model, kw, needle):
    with pytest.raises(ZsqError, match=__import__("re").escape(needle)):
        zsq.quantize(zsq.ModelSource(model, **kw))


def test_explicit_metadata_never_loses_silently_to_the_models_own():
    with pytest.raises(ZsqError, match=r"input_size=\(3, 64, 64\) contradicts the model's own metadata"):
        zsq.quantize(zsq.ModelSource(R20, random_init=True, input_size=(3, 64, 64)))
    with pytest.raises(ZsqError, match="mean=.*contradicts"):
        zsq.quantize(zsq.ModelSource(R20, random_init=True, mean=(0.0, 0.0, 0.0)))
    net = _Net()
    zsq.models.set_meta(net, zsq.models.ModelMeta("n", 10, (3, 8, 8), (0.5,) * 3, (0.25,) * 3))
    with pytest.raises(ZsqError, match="std=.*contradicts"):
        zsq.quantize(zsq.ModelSource(net, std=(1.0, 1.0, 1.0)))
    meta = zsq.models.load(R20).zsq_meta  # agreeing values are fine
    rep = zsq.quantize(zsq.ModelSource(R20, random_init=True, input_size=meta.input_size, mean=meta.mean,
                                       std=meta.std)).report
    assert rep["bits"] == "w4a4"
