"""Logging: the library logs to the `zsq` logger and configures nothing; the CLI sets the level."""
import logging

import pytest

import zsq
from zsq.cli import main
from zsq.progress import bars_enabled, cli_logging, progress

ARGV = ["quantize", "cifar10_resnet20", "--random-init", "--method", "minmax", "--synth", "noise",
        "--num-images", "8", "--bits", "w8a8"]


@pytest.fixture
def zsq_logger():
    log = logging.getLogger("zsq")
    state = (log.level, log.propagate, list(log.handlers))
    yield log
    assert (log.level, log.propagate, list(log.handlers)) == state, "the test left the zsq logger changed"


def test_import_configures_no_handler(zsq_logger):
    assert zsq_logger.handlers == [] and zsq_logger.level == logging.NOTSET
    assert bars_enabled()


@pytest.mark.parametrize("flags, lines", [([], True), (["--quiet"], False)])
def test_cli_level_and_restore(capsys, tmp_path, zsq_logger, flags, lines):
    assert main([*ARGV, "--out", str(tmp_path / "q"), "--json", *flags]) == 0
    err = capsys.readouterr().err
    assert ("[zsq] quantizing with minmax" in err) is lines, err
    if not lines:
        assert "[zsq]" not in err


def test_cli_verbose_sets_debug(zsq_logger):
    from zsq.cli import build_parser, log_level

    assert log_level(build_parser().parse_args([*ARGV, "--out", "x", "-v"])) == logging.DEBUG
    assert log_level(build_parser().parse_args([*ARGV, "--out", "x", "--quiet"])) == logging.WARNING
    assert log_level(build_parser().parse_args([*ARGV, "--out", "x"])) == logging.INFO


def test_library_logs_reach_the_callers_handlers_not_stderr(capfd, caplog, zsq_logger):
    with caplog.at_level(logging.INFO, logger="zsq"):
        zsq.quantize(zsq.ModelSource("cifar10_resnet20", random_init=True), method="minmax",
                     calibration=zsq.Calibration(synth="noise", num_images=8), bits="w8a8")
    assert any(r.name == "zsq.run" and "quantizing with minmax" in r.getMessage() for r in caplog.records)
    caplog.clear()
    zsq.quantize(zsq.ModelSource("cifar10_resnet20", random_init=True), method="minmax",
                 calibration=zsq.Calibration(synth="noise", num_images=8), bits="w8a8")
    assert "quantizing with" not in capfd.readouterr().err  # no handler of zsq's own: the caller decides


def test_progress_follows_the_level(caplog, monkeypatch, zsq_logger):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="zsq"):
        assert list(progress(range(3), total=3, desc="work", log_every=0.0)) == [0, 1, 2]
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["work: 1/3", "work: 2/3", "work: 3/3"]
    caplog.clear()
    caplog.set_level(logging.DEBUG)  # the root takes everything; only the zsq logger's level decides
    zsq_logger.setLevel(logging.WARNING)
    try:
        assert not bars_enabled()
        assert list(progress(range(3), total=3, desc="work", log_every=0.0)) == [0, 1, 2]
    finally:
        zsq_logger.setLevel(logging.NOTSET)
    assert caplog.records == []
    assert bars_enabled()


def test_cli_logging_writes_the_prefixed_line_to_stderr(capsys, zsq_logger):
    with cli_logging(logging.INFO):
        logging.getLogger("zsq.somewhere").info("hello %d", 3)
        logging.getLogger("zsq.somewhere").debug("hidden")
        logging.getLogger("other").warning("not ours")
    err = capsys.readouterr().err
    assert "[zsq] hello 3\n" in err and "hidden" not in err and "[zsq] not ours" not in err
