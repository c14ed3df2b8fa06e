"""Distillation-based quantization-aware training: one GDFQ-style loop (loop.py) with AIT's KL-only
loss and gradient inundation (losses.py, inundation.py), HAST's hard-sample step (difficulty_promotion.py) and SynQ's
low-pass filter, Grad-CAM alignment and easy-sample CE (synq.py) as parts.

Methods (registered by zsq.qat.distillation_methods): gdfq, ait, hast, hast-paper, synq. See docs/qat.md.
"""
from zsq.qat.training_config import HASTTrainConfig, QATConfig, SynQConfig, method_config, paper_config  # noqa: F401
from zsq.qat.inundation import GIConfig, GradientInundation, quantized_weight_layers  # noqa: F401
from zsq.qat.losses import channel_attention, feature_alignment_loss, kd_kl_loss  # noqa: F401
from zsq.qat.loop import distill  # noqa: F401
from zsq.qat import distillation_methods  # noqa: F401,E402  (registers gdfq, ait, hast, hast-paper, synq)
