"""Quantization methods: the registry every family registers into, and the calibration baselines.

Importing this package registers bn-minmax and minmax; ``zsq.ptq`` and ``zsq.qat`` register their own
methods when imported (``zsq/__init__`` imports both, so every method is listed).
"""
from zsq.methods.registry import QuantJob, QuantResult, get_method, list_methods, register_method  # noqa: F401

from zsq.methods import bn_minmax  # noqa: F401,E402
from zsq.methods import data_free  # noqa: F401,E402
