import numpy as np
import pytest
import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.evaluation import agreement, evaluate, mcnemar
from zsq.models.meta import ModelMeta, set_meta


class Nearest(nn.Module):
    """Logits -|c - v| where v = x[:, 0, 0, 0]: ranks classes by distance to v (ties: lower index)."""

    def forward(self, x):
        v = x[:, 0, 0, 0:1]
        return -(torch.arange(10.0) - v).abs() - 1e-3 * torch.arange(10.0)


def _data(values, labels):
    x = torch.zeros(len(values), 3, 4, 4)
    x[:, 0, 0, 0] = torch.tensor(values, dtype=torch.float32)
    return x, torch.tensor(labels)


def test_top1_top5_counts():
    # v=3 -> ranking 3,2,4,1,5: label 3 top-1; label 5 top-5 only; label 9 neither; v=0 label 0 top-1.
    x, y = _data([3, 3, 3, 0, 9], [3, 5, 9, 0, 7])
    r = evaluate(Nearest(), (x, y), batch_size=2, return_preds=True)
    assert r["n"] == 5
    assert r["top1"] == pytest.approx(40.0)
    assert r["top5"] == pytest.approx(80.0)  # label 7 for v=9: ranking 9,8,7 -> in top 5
    assert r["preds"] == [3, 3, 3, 0, 9]
    assert r["hits"] == [1, 0, 0, 1, 0]  # top-1 right per image, in data order


def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_p():
    n10, n01, p = mcnemar([1, 1, 1, 0, 0, 1], [1, 0, 0, 1, 0, 1])
    assert (n10, n01) == (2, 1) and p == pytest.approx(1.0)  # 2 * P(X <= 1 | Bin(3, 1/2)), capped at 1
    n10, n01, p = mcnemar([1] * 10, [0] * 10)
    assert (n10, n01) == (10, 0) and p == pytest.approx(2 / 2 ** 10)
    assert mcnemar([1, 0], [1, 0]) == (0, 0, 1.0)
    with pytest.raises(ZsqError, match="2 against 1 images"):
        mcnemar([1, 0], [1])


def test_restores_training_mode_and_no_grad():
    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 10), nn.Dropout(0.5))
    m.train()
    x, y = _data([0, 1], [0, 1])
    a = evaluate(m, (x, y), return_preds=True)
    b = evaluate(m, (x, y), return_preds=True)
    assert a["preds"] == b["preds"]  # dropout off during evaluation
    assert m.training


def test_spec_string_uses_model_meta(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8), y=np.arange(7))
    m = set_meta(Nearest(), ModelMeta("n", 10, (3, 4, 4), (0, 0, 0), (1 / 255, 1, 1)))
    r = evaluate(m, str(tmp_path / "d.npz") + "[2:6]", return_preds=True)
    assert r["n"] == 4
    # With std 1/255 the first channel is the raw pixel value, so predictions are min(pixel, 9).
    px = np.load(tmp_path / "d.npz")["x"][2:6, 0, 0, 0]
    assert r["preds"] == [min(int(p), 9) for p in px]
    with pytest.raises(ZsqError, match="no zsq metadata"):
        evaluate(Nearest(), str(tmp_path / "d.npz"))


def test_agreement():
    assert agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 75.0
    with pytest.raises(ZsqError):
        agreement([1], [1, 2])


def test_loading_uses_workers_and_pinned_memory_only_for_cuda(monkeypatch):
    import zsq.evaluation as ev
    from zsq.compute import loader_options

    assert loader_options("cpu") == {"num_workers": 0} == loader_options(torch.device("cpu"))
    cuda = loader_options("cuda:1")  # the options only; no GPU needed to decide them
    assert cuda["pin_memory"] is True and 1 <= cuda["num_workers"] <= 4
    seen = []

    class Stop(Exception):
        pass

    def fake_loader(data, **kw):
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(ev, "DataLoader", fake_loader)
    data = (torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    for device in ("cpu", "cuda"):
        with pytest.raises(Stop):
            ev.evaluate(net, data, device=device)
    assert seen[0]["num_workers"] == 0 and "pin_memory" not in seen[0]
    assert seen[1]["pin_memory"] is True and seen[1]["num_workers"] >= 1
