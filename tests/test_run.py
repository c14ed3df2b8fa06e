"""The one pipeline's contract: every registered method through ``zsq.run.execute`` on a tiny model.

The report has only documented keys (zsq.run.REPORT_KEYS), keeps the method's own report whole (nothing
dropped by a merge), and the checkpoint's ``info`` is the finished report (accuracy included); the
result depends on the run's seed only, never on the caller's global RNG.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch

import zsq
from tests.tiny_models import tiny_factory
from zsq.errors import ZsqError
from zsq.methods import list_methods
from zsq.run import (FILE_KEYS, REPORT_KEYS, Calibration, MethodSpec, ModelSource, Output, QuantSpec, Run,
                     RunBudget, execute)


def _eval_npz(tmp_path):
    """Eight labelled 16x16 images (uint8 NHWC, the .npz form zsq reads)."""
    rng = np.random.default_rng(0)
    p = tmp_path / "eval.npz"
    np.savez(p, x=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), y=np.arange(8) % 10)
    return str(p)


def _run(name, model, out, eval_data):
    info = list_methods()[name]
    wants_images = info.needs_images  # noise: the cheapest synthesizer, the synthesis step still runs
    return Run(model=ModelSource(model), method=MethodSpec(name), quant=QuantSpec("w4a4"),
               calibration=Calibration(synth="noise", num_images=8) if wants_images else Calibration(),
               eval_data=eval_data, output=Output(out),
               budget=RunBudget("quick", iters=2, epochs=1, iters_per_epoch=1, batch_size=8), seed=1)


def _spy(monkeypatch, name):
    """Record the report the method itself returns (what the pipeline must keep whole)."""
    import zsq.run as run_module

    info = list_methods()[name]
    seen = []

    def fn(fp_model, qconfig, job):
        res = info.fn(fp_model, qconfig, job)
        seen.append(json.loads(json.dumps(res.report, default=str)))
        return res

    monkeypatch.setattr(run_module, "get_method", lambda n: dataclasses.replace(info, fn=fn))
    return seen


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_every_method_through_execute_keeps_its_report_and_writes_the_final_one(name, tmp_path, monkeypatch):
    seen = _spy(monkeypatch, name)
    model, eval_data = tiny_factory(), _eval_npz(tmp_path)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    res = execute(_run(name, model, tmp_path / "a", eval_data))
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left as it was
    rep = res.report

    assert set(rep) <= set(REPORT_KEYS), set(rep) - set(REPORT_KEYS)
    required = {"model", "method", "bits", "preset", "preset_version", "calib_source", "num_images", "options",
                "compute", "processes", "capture", "fp32_top1", "quant_top1", "quant_top5", "n", "synth_seconds",
                "quant_seconds", "seconds", "method_report", "out", "packed_bytes", "fp32_bytes"}
    assert required <= set(rep), required - set(rep)
    assert rep["method"] == name and rep["bits"] == "w4a4" and rep["n"] == 8
    assert rep["preset"] == list_methods()[name].default_preset  # the run's preset, not the method's own text
    assert rep["calib_source"] == ("synthetic:noise" if list_methods()[name].needs_images else "none")
    # nothing the method reported was dropped or overwritten
    assert len(seen) == 1 and json.loads(json.dumps(rep["method_report"], default=str)) == seen[0]

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    final = {k: v for k, v in rep.items() if k not in FILE_KEYS}
    assert manifest["info"] == json.loads(json.dumps(final, default=str))  # written after accuracy
    assert manifest["packed_bytes"] == rep["packed_bytes"]

    torch.manual_seed(456)  # another caller state, another folder: the same quantized model
    again = execute(_run(name, model, tmp_path / "b", eval_data))
    a, b = res.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.report["quant_top1"] == rep["quant_top1"]


def test_the_api_builds_the_same_run(tmp_path):
    """zsq.quantize is a thin builder: its model is the one execute gives for the same Run."""
    model = tiny_factory()
    api = zsq.quantize(model, method="bn-minmax", bits="w8a8", out=tmp_path / "a")
    run = execute(Run(model=ModelSource(model), method=MethodSpec("bn-minmax"), quant=QuantSpec("w8a8"),
                      output=Output(tmp_path / "b")))
    a, b = api.model.state_dict(), run.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "packed_weights.safetensors").read_bytes() == \
        (tmp_path / "b" / "packed_weights.safetensors").read_bytes()


def test_fingerprint_names_what_decides_the_run():
    run = Run(model=ModelSource("cifar10_resnet20"), method=MethodSpec("genie", {"chunk": 2}),
              quant=QuantSpec("w4a4", "genie"), calibration=Calibration(synth="genie", num_images=32), seed=3)
    fp = run.fingerprint("cifar10_resnet20", "abc")
    assert fp == {"model": "cifar10_resnet20", "weights": "abc", "method": "genie", "bits": "w4a4",
                  "preset": "genie", "synth": "genie", "num_images": 32, "budget": "quick", "iters": None,
                  "epochs": None, "iters_per_epoch": None, "batch_size": None, "seed": 3, "options": {"chunk": 2},
                  "calib_data": None}
    other = dataclasses.replace(run, seed=4).fingerprint("cifar10_resnet20", "abc")
    assert other["seed"] == 4 and {k: v for k, v in other.items() if k != "seed"} == \
        {k: v for k, v in fp.items() if k != "seed"}
    given = dataclasses.replace(run, calibration=Calibration(images=torch.zeros(2, 3, 4, 4)))
    assert given.fingerprint("m", "w")["calib_images"].startswith("tensor:")


@pytest.mark.parametrize("build, needle", [
    (lambda: Run(model="cifar10_resnet20"), "Run.model must be a zsq.run.ModelSource"),
    (lambda: RunBudget("slow"), "budget must be one of quick, standard, paper"),
    (lambda: Calibration(synth="genie", data="x.npz"), "either --synth or --calib-data"),
    (lambda: Calibration(images=torch.zeros(1, 3, 4, 4), synth="genie"), "drop synth/calib_data"),
    (lambda: Calibration(labels=torch.zeros(2)), "labels need calibration images"),
    (lambda: MethodSpec("genie", options=["chunk=2"]), "options must be a dict"),
])
def test_a_malformed_run_is_refused_when_built(build, needle):
    with pytest.raises(ZsqError, match=needle):
        build()


def test_a_broken_invariant_is_an_internal_error_not_bad_input(capsys, tmp_path, monkeypatch):
    """A report key the schema does not document is zsq's bug: exit 3 and a request to report it, not exit 2."""
    import zsq.run as run_module
    from zsq.cli import main

    monkeypatch.setattr(run_module, "REPORT_KEYS", {k: v for k, v in REPORT_KEYS.items() if k != "capture"})
    code = main(["quantize", "cifar10_resnet20", "--random-init", "--method", "bn-minmax", "--bits", "w8a8",
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3
    assert "zsq: internal error: report keys not documented in zsq.run.REPORT_KEYS: capture" in err
    assert "please report it" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "manifest.json").exists()  # the report failed before the checkpoint was written
