"""Post-training quantization by block reconstruction: Genie-M, QDrop, BRECQ and AdaRound.

    import zsq
    result = zsq.quantize(teacher, method="genie", bits="w4a4", calibration=zsq.Calibration(synth="genie"))

See docs/ptq.md. Importing ``zsq.ptq`` registers its methods and the brecq/qdrop presets.
"""
from zsq.ptq.budgets import BUDGETS, RECIPES, Budget, EngineOptions, Phase, Recipe, get_budget  # noqa: F401
from zsq.ptq.reconstruct import Reconstructor  # noqa: F401
from zsq.ptq.soft_round import SoftRoundQuantizer, to_uniform  # noqa: F401
from zsq.ptq.units import Unit, find_units, register_block_type  # noqa: F401
from zsq.ptq import reconstruction_methods  # noqa: F401,E402  (registers genie, qdrop, brecq, adaround)
