"""One benchmark harness: suites of (model, method, bits, data) cells run resumably into
DIR/results.json and summarised in DIR/report.md (see docs/bench.md)."""
from zsq.bench.suites import Cell, Suite, get_suite, list_suites
from zsq.bench.runner import run_suite

__all__ = ["Cell", "Suite", "get_suite", "list_suites", "run_suite"]
