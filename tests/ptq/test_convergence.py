"""Units that stop once converged (zsq.ptq.convergence and the engine's use of it)."""
import pytest
import torch

from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob
from zsq.ptq.convergence import Monitor, StopRule
from zsq.ptq.reconstruction_methods import genie
from zsq.quant import get_preset


def _feed(mon: Monitor, series):
    """(t, soft, hard) triples at the monitor's check times; the t where it stopped, else None."""
    for t, soft, hard in series:
        assert mon.due(t)
        if mon.add(t, soft, hard):
            return t
    return None


def test_stops_on_a_plateau_of_the_hardened_error_once_hardening_costs_little():
    rule = StopRule(every=10, patience=2, rel_tol=0.01, max_gap=0.05, min_share=0.0)
    mon = Monitor(rule, ceiling=200, first=40)
    assert not mon.due(30) and not mon.due(45) and mon.due(40) and mon.due(50) and not mon.due(200)
    hard = [2.0, 1.5, 1.2, 1.0, 0.999, 0.998, 0.997]
    stopped = _feed(mon, [(40 + 10 * i, h / 1.01, h) for i, h in enumerate(hard)])
    assert stopped == 90 and mon.stopped_at == 90


def test_does_not_stop_while_hardening_still_costs_much():
    rule = StopRule(every=10, patience=2, rel_tol=0.01, max_gap=0.05, min_share=0.0)
    mon = Monitor(rule, ceiling=200, first=40)
    # the hardened error is flat but twice the soft one: the anneal has not pushed the bits to 0/1 yet
    assert _feed(mon, [(40 + 10 * i, 0.5, 1.0) for i in range(15)]) is None
    assert len(mon.checks) == 15


def test_no_check_before_the_minimum_share_of_the_ceiling():
    mon = Monitor(StopRule(every=10, min_share=0.5), ceiling=300, first=60)
    assert [t for t in range(1, 300) if mon.due(t)][0] == 150


@pytest.mark.parametrize("kwargs", [dict(every=0), dict(patience=0), dict(rel_tol=1.0), dict(max_gap=-0.1),
                                    dict(min_share=1.5), dict(check_images=0)])
def test_bad_rules_are_refused(kwargs):
    with pytest.raises(ZsqError):
        StopRule(**kwargs)


@pytest.mark.parametrize("key,value", [("stop_every", 0), ("stop_patience", 0), ("stop_rel_tol", 0.9),
                                       ("stop_max_gap", -1.0)])
def test_bad_stop_options_are_refused_before_any_work(tiny, tiny_images, key, value):
    job = QuantJob(calib=tiny_images, iters=4, batch_size=16, extra={"early_stop": True, key: value})
    with pytest.raises(ZsqError, match=key):
        genie(tiny, get_preset("genie", "w4a4"), job)


def _run(tiny_factory_model, images, extra):
    job = QuantJob(calib=images, iters=60, batch_size=16, extra=extra)
    return genie(tiny_factory_model, get_preset("genie", "w4a4"), job)


def test_checks_leave_the_run_unchanged_and_a_stop_is_recorded(tiny_images):
    from tests.tiny_models import make_tiny

    plain = _run(make_tiny(), tiny_images, {"early_stop": False})
    watched = _run(make_tiny(), tiny_images, {"early_stop": True, "stop_patience": 10_000, "stop_every": 5})
    # measuring without QDrop draws nothing from the unit's generator: same model bit for bit
    assert torch.equal(plain.model(tiny_images), watched.model(tiny_images))
    units = watched.report["unit_losses"]
    assert all(u["iters_run"] == u["iters"] == 60 and u["stopped_at"] is None and u["checks"] for u in units)
    assert all(u["iters_run"] == 60 and "checks" not in u for u in plain.report["unit_losses"])
    for u in units:  # checks at the rule's times, the soft and hardened errors both recorded
        ts = [c[0] for c in u["checks"]]
        assert ts == list(range(ts[0], 60, 5)) and ts[0] >= 18 and all(c[1] >= 0 and c[2] >= 0 for c in u["checks"])
    # a loose rule stops units early; the report says where, and the model still works
    loose = _run(make_tiny(), tiny_images, {"early_stop": True, "stop_every": 5, "stop_patience": 1,
                                            "stop_rel_tol": 0.4, "stop_max_gap": 10.0})
    lu = loose.report["unit_losses"]
    assert any(u["stopped_at"] is not None and u["iters_run"] == u["stopped_at"] < 60 for u in lu)
    assert all(u["iters_run"] <= 60 for u in lu) and torch.isfinite(loose.model(tiny_images)).all()
