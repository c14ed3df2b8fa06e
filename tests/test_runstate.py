"""zsq.runstate: state files round-trip exactly, refuse damage and tampering in one line, run no code."""
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

import zsq
from zsq import runstate
from zsq.errors import ZsqError


def _state():
    return {"fingerprint": {"seed": 3, "lr": 0.1}, "done": 2, "betas": (0.9, 0.999), "loss": float("nan"),
            "opt": {"state": {0: {"step": torch.tensor(5.0), "m": torch.randn(3, 2)}}, "param_groups": [
                {"params": [0, 1], "lr": 1e-3}]},
            "records": [{"unit": "layer1", "loss": 0.25}], "empty": torch.zeros(0), "flag": torch.tensor([True])}


def test_round_trip_is_exact(tmp_path):
    s = _state()
    back = runstate.load_state(runstate.save_state(tmp_path / "s.safetensors", s))
    assert back["betas"] == (0.9, 0.999) and back["done"] == 2 and back["records"] == s["records"]
    assert list(back["opt"]["state"]) == [0] and back["opt"]["param_groups"] == s["opt"]["param_groups"]
    assert torch.equal(back["opt"]["state"][0]["m"], s["opt"]["state"][0]["m"])
    assert back["opt"]["state"][0]["step"].dim() == 0 and back["empty"].shape == (0,)
    assert back["loss"] != back["loss"]  # NaN survives as NaN
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed into place


def test_optimizer_state_resumes_identically(tmp_path):
    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(2):
        opt.zero_grad(); (w ** 2).sum().backward(); opt.step()
    runstate.save_state(tmp_path / "o.safetensors", {"w": w.detach(), "opt": opt.state_dict()})
    w2 = torch.nn.Parameter(torch.zeros(4))
    opt2 = torch.optim.Adam([w2], lr=0.1)
    back = runstate.load_state(tmp_path / "o.safetensors")
    with torch.no_grad():
        w2.copy_(back["w"])
    runstate.restore(opt2, back["opt"], tmp_path / "o.safetensors")
    for o, p in ((opt, w), (opt2, w2)):
        o.zero_grad(); (p ** 2).sum().backward(); o.step()
    assert torch.equal(w, w2)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "tamper_json", "tamper_tensor"])
def test_damaged_or_edited_files_are_one_line_errors(tmp_path, damage):
    p = runstate.save_state(tmp_path / "s.safetensors", _state())
    raw = bytearray(p.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"\x00not a state file at all")
    elif damage == "tamper_json":
        raw = bytearray(bytes(raw).replace(b'\\"done\\": 2', b'\\"done\\": 9'))
        assert bytes(raw) != p.read_bytes()
    else:
        raw[-1] ^= 0xFF  # a tensor byte
    p.write_bytes(bytes(raw))
    with pytest.raises(ZsqError) as e:
        runstate.load_state(p)
    msg = str(e.value)
    assert "s.safetensors" in msg and "\n" not in msg
    assert ("changed after zsq wrote it" in msg) == damage.startswith("tamper")


def test_refusal_names_every_difference():
    old = runstate.fingerprint(method="genie", cfg={"iters": 3}, images=torch.ones(2))
    new = runstate.fingerprint(method="zeroq", cfg={"iters": 3}, images=torch.zeros(2))
    with pytest.raises(ZsqError, match=r"cannot resume from OUT: .*images \(checkpoint: 'tensor:\w+', now: "
                                       r"'tensor:\w+'\); method \(checkpoint: 'genie', now: 'zeroq'\)"):
        runstate.check_same_run("OUT", old, new)
    runstate.check_same_run("OUT", old, runstate.fingerprint(method="genie", cfg={"iters": 3}, images=torch.ones(2)))


def test_json_is_always_valid(tmp_path):
    with pytest.raises(ZsqError, match=r"non-finite values \(b\.x, c\.1\)"):
        runstate.write_json(tmp_path / "r.json", {"a": 1.0, "b": {"x": float("nan")}, "c": [0.0, float("inf")]})
    assert not (tmp_path / "r.json").exists()
    (tmp_path / "t.json").write_text('{"a": ')
    with pytest.raises(ZsqError, match="t.json is damaged"):
        runstate.read_json(tmp_path / "t.json")


def test_no_pickle_loading_in_the_package():
    """Nothing in zsq unpickles arbitrary objects: every torch.load passes weights_only=True."""
    root = Path(zsq.__file__).parent
    offenders = []
    for f in root.rglob("*.py"):
        text = f.read_text()
        if re.search(r"weights_only\s*=\s*False", text) or "pickle.load" in text:
            offenders.append(str(f))
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{f}: torch.load({call})")
    assert not offenders, offenders


class _Marker:
    """Unpickling this would create a marker file (the attack a shared run folder could carry)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("where", ["ptq", "qat", "synth_batch", "weights"])
def test_a_crafted_pickle_never_runs(tmp_path, where):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"state": _Marker(marker)})
    if where == "weights":
        bad = tmp_path / "evil.pth"
        bad.write_bytes(payload)
        with pytest.raises(ZsqError) as e:
            zsq.models.load("cifar10_resnet20", weights=bad)
    else:
        from zsq.ptq import unit_checkpoint
        from zsq.qat.loop import STATE_FILE
        from zsq.synth.base import batch_file

        target = {"ptq": tmp_path / "work" / unit_checkpoint.CKPT_NAME, "qat": tmp_path / "work" / STATE_FILE,
                  "synth_batch": batch_file(tmp_path / "ckpt", 0)}[where]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
        with pytest.raises(ZsqError) as e:
            runstate.load_state(target)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_source_digest_names_the_code(tmp_path):
    from zsq.runstate import source_digest

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not code")
    d = source_digest(tmp_path)
    assert len(d) == 16 and d == source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("other notes")
    assert source_digest(tmp_path) == d                     # only .py files count
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != d                     # one changed byte is another code
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "c.py")
    assert source_digest(tmp_path) != d                     # a moved file too
    assert len(source_digest()) == 16                       # the installed zsq package
