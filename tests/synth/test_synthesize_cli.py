import argparse
import json

import zsq.models
from zsq.synth import SyntheticSet
from zsq.cli.synthesize import add_parser, run
from tests.tiny_models import tiny_bn_cnn


def test_cli_synthesize_json(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_load(name, weights=None, **model_flags):  # the CLI also passes --input-size etc. (None here)
        seen.update(name=name, weights=weights)
        return tiny_bn_cnn()

    monkeypatch.setattr(zsq.models, "load", fake_load, raising=False)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["synthesize", "tiny", "--weights", "w.pt", "--method", "genie", "--num-images", "8",
                              "--iters", "2", "--batch-size", "4", "--seed", "1", "--out", str(tmp_path / "s"),
                              "--json", "--quiet"])
    result = args.func(args)
    assert seen == {"name": "tiny", "weights": "w.pt"}
    assert capsys.readouterr().out == ""  # zsq.cli.main prints the returned dict
    assert json.loads(json.dumps(result)) == result
    assert result["num_images"] == 8 and result["method"] == "genie" and result["bns_loss"] > 0
    assert result["seconds"] > 0 and result["seed"] == 1
    assert len(SyntheticSet.load(tmp_path / "s")) == 8
    # --resume on the finished run returns the same set
    args.resume = True
    assert run(args)["bns_loss"] == result["bns_loss"]


def test_cli_synthesize_set_overrides_config(tmp_path, monkeypatch):
    import pytest

    from zsq.errors import ZsqError

    monkeypatch.setattr(zsq.models, "load", lambda name, weights=None, **model_flags: tiny_bn_cnn(), raising=False)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    base = ["synthesize", "tiny", "--method", "genie", "--num-images", "4", "--iters", "1", "--quiet", "--random-init"]
    args = parser.parse_args(base + ["--out", str(tmp_path / "a"), "--set", "lr_z=0.05", "--set", "head=linear"])
    run(args)
    cfg = SyntheticSet.load(tmp_path / "a").meta["config"]
    assert cfg["lr_z"] == 0.05 and cfg["head"] == "linear"
    args = parser.parse_args(base + ["--out", str(tmp_path / "b"), "--set", "nope=1"])
    with pytest.raises(ZsqError, match="no option nope"):
        run(args)
