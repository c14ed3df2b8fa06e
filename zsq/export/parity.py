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
    """min_agreement: least fraction of images whose top-1 class must match; None (default) means
    the model's own float floor minus ``floor_margin`` (``numeric_floor``: a model that disagrees
    with its own float64 copy on k % of images cannot be expected to agree better with a runtime).
    max_rel_logit_diff: largest |logit difference| allowed, relative to the reference logits'
    standard deviation (a flip of one activation step moves logits by a small fraction of it)."""

    min_agreement: Optional[float] = None
    max_rel_logit_diff: float = 0.5
    floor_margin: float = 0.002

    def __post_init__(self):
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ZsqError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.max_rel_logit_diff <= 0:
            raise ZsqError(f"max_rel_logit_diff must be positive, got {self.max_rel_logit_diff}")
        if not 0.0 <= self.floor_margin <= 1.0:
            raise ZsqError(f"floor_margin must be in [0, 1], got {self.floor_margin}")

    def bar(self, floor: Optional[float]) -> float:
        if self.min_agreement is not None:
            return self.min_agreement
        return max(0.0, (1.0 if floor is None else floor) - self.floor_margin)


def numeric_floor(qmodel: nn.Module, images: torch.Tensor, batch_size: int = 64) -> float:
    """Top-1 agreement of the model with its own float64 copy: how far float rounding alone moves
    its predictions (values near a rounding boundary flip; at low bits a flip cascades)."""
    import copy

    ref = run_torch(qmodel, images, batch_size)
    m64 = copy.deepcopy(qmodel).double().eval()
    with torch.no_grad():
        got = torch.cat([m64(images[i:i + batch_size].double()) for i in range(0, images.shape[0], batch_size)])
    return float((ref.argmax(1) == got.argmax(1).numpy()).mean())


def ort_session(onnx_path, threads: int = 2):
    import onnxruntime as ort

    from zsq.export.runtimes import _load_error

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _load_error("onnxruntime", ort.__version__, onnx_path, e) from None


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


def _int8_hint(onnx_path) -> str:
    """Why a graph with int8 weights may disagree on this CPU, if that is the case."""
    from zsq.export.runtimes import cpu_has_int8_dot, int8_weight_names

    if cpu_has_int8_dot() or not int8_weight_names(onnx_path):
        return ""
    return ("; this CPU has no VNNI, where int8-weight graphs run inexactly (onnxruntime saturates int16 sums): "
            "export with --weight-dtype portable")


def check_parity(qmodel: nn.Module, onnx_path, images: torch.Tensor, labels=None, *,
                 tolerance: ParityTolerance = ParityTolerance(), batch_size: int = 64, threads: int = 2,
                 runtime: str = "ort", floor: Optional[float] = None) -> dict:
    """Run the zsq model and ``runtime`` on ``images``; return the comparison (with the model's
    float floor, measured here unless given), raise ZsqError when out of tolerance."""
    from zsq.export.runtimes import open_runtime, run_batches

    ref = _finite(run_torch(qmodel, images, batch_size), "the zsq model")
    rt = open_runtime(runtime, onnx_path, threads)
    got = _finite(run_batches(rt, images, batch_size), {"ort": "onnxruntime"}.get(runtime, runtime))
    res = compare_logits(ref, got, None if labels is None else np.asarray(labels))
    if floor is None and tolerance.min_agreement is None:
        floor = numeric_floor(qmodel, images, batch_size)
    bar = tolerance.bar(floor)
    res.update({"runtime": rt.name, "runtime_version": rt.version, "float_floor": floor, "min_agreement": bar,
                "max_rel_logit_diff_allowed": tolerance.max_rel_logit_diff, "integer_ops": rt.integer_ops()})
    if res["top1_agreement"] < bar or res["max_rel_logit_diff"] > tolerance.max_rel_logit_diff:
        floor_txt = f", model's own float floor {floor:.4f}" if floor is not None else ""
        raise ZsqError(f"{rt.name} disagrees with the zsq model: top-1 agreement {res['top1_agreement']:.4f} "
                       f"(need >= {bar:.4f}{floor_txt}), max logit diff {res['max_logit_diff']:.4g} = "
                       f"{res['max_rel_logit_diff']:.3f} x logit std (allowed {tolerance.max_rel_logit_diff}) "
                       f"on {res['n']} images"
                       + (f" (zsq model top-1 {res['torch_top1']:.3f}: a model with near-tied logits flips easily; "
                          f"loosen --min-agreement to accept)" if "torch_top1" in res else "")
                       + _int8_hint(onnx_path))
    return res
