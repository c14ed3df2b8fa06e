"""Quantization methods; importing this package registers every method.

Each line below imports one method family's registration; add yours here.
"""
from zsq.methods.registry import QuantJob, QuantResult, get_method, list_methods, register_method  # noqa: F401

from zsq.methods import bn_minmax  # noqa: F401,E402
from zsq.qat import methods as _qat_methods  # noqa: F401,E402
from zsq.ptq import methods as _ptq_methods  # noqa: F401,E402
