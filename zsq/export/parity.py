"""Does the exported ONNX graph compute what the zsq fake-quant model computes?

onnxruntime and PyTorch sum convolutions in different orders, so a value sitting on a rounding
boundary can land one quantization step apart in the two; a few such flips move logits by a
small amount and very rarely change a prediction. The check therefore reports top-1 agreement
and the logit differences, and fails only beyond tolerances that such flips stay well within.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from zsq.errors import ZsqError


@dataclass(frozen=True)
class ParityTolerance:
    """min_agreement: least fraction of images whose top-1 class must match.
    max_rel_logit_diff: largest |logit difference| allowed, relative to the reference logits'
    standard deviation (a flip of one activation step moves logits by a small fraction of it)."""

    min_agreement: float = 0.99
    max_rel_logit_diff: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ZsqError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.max_rel_logit_diff <= 0:
            raise ZsqError(f"max_rel_logit_diff must be positive, got {self.max_rel_logit_diff}")


def ort_session(onnx_path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])


def run_ort(session, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: images[i:i + batch_size].numpy().astype(np.float32)})[0]
            for i in range(0, images.shape[0], batch_size)]
    return np.concatenate(outs)


def run_torch(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]).numpy()


def compare_logits(ref: np.ndarray, got: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
    diff = np.abs(ref - got)
    out = {"n": int(ref.shape[0]),
           "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
           "max_logit_diff": float(diff.max()),
           "mean_logit_diff": float(diff.mean()),
           "logit_std": float(ref.std()),
           "exact_match_fraction": float((diff == 0).all(axis=1).mean())}
    out["max_rel_logit_diff"] = out["max_logit_diff"] / max(out["logit_std"], 1e-12)
    if labels is not None:
        out["torch_top1"] = float((ref.argmax(1) == labels).mean())
        out["onnx_top1"] = float((got.argmax(1) == labels).mean())
    return out


def _finite(logits: np.ndarray, who: str) -> np.ndarray:
    """NaN logits compare as 'not greater than' any tolerance, so they must be refused explicitly."""
    if not np.isfinite(logits).all():
        raise ZsqError(f"{who} gives NaN or inf logits on the check images; the model is broken, parity cannot pass")
    return logits


def check_parity(qmodel: nn.Module, onnx_path, images: torch.Tensor, labels=None, *,
                 tolerance: ParityTolerance = ParityTolerance(), batch_size: int = 64, threads: int = 2) -> dict:
    """Run both on ``images``; return the comparison, raise ZsqError when out of tolerance."""
    ref = _finite(run_torch(qmodel, images, batch_size), "the zsq model")
    got = _finite(run_ort(ort_session(onnx_path, threads), images, batch_size), "onnxruntime")
    res = compare_logits(ref, got, None if labels is None else np.asarray(labels))
    res.update({"min_agreement": tolerance.min_agreement, "max_rel_logit_diff_allowed": tolerance.max_rel_logit_diff})
    if res["top1_agreement"] < tolerance.min_agreement or res["max_rel_logit_diff"] > tolerance.max_rel_logit_diff:
        raise ZsqError(f"ONNX export disagrees with the zsq model: top-1 agreement {res['top1_agreement']:.4f} "
                       f"(need >= {tolerance.min_agreement}), max logit diff {res['max_logit_diff']:.4g} = "
                       f"{res['max_rel_logit_diff']:.3f} x logit std (allowed {tolerance.max_rel_logit_diff}) "
                       f"on {res['n']} images"
                       + (f" (zsq model top-1 {res['torch_top1']:.3f}: a model with near-tied logits flips easily; "
                          f"loosen --min-agreement to accept)" if "torch_top1" in res else ""))
    return res
