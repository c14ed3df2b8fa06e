"""Top-1/top-5 accuracy of a model on labelled real images (the only place real labels are used)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from zsq.compute import loader_options
from zsq.errors import ZsqError
from zsq.models.meta import get_meta
from zsq.progress import progress


def default_batch_size(model: nn.Module) -> int:
    """Large batches for small (CIFAR-size) inputs, moderate for ImageNet-size ones."""
    meta = getattr(model, "zsq_meta", None)
    if meta is not None and meta.small_input:
        return 500
    return 50


def evaluate(
    model: nn.Module,
    data: Union[str, Path, Dataset, tuple],
    batch_size: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    return_preds: bool = False,
) -> dict:
    """Accuracy of ``model`` on ``data``: ``{"top1": %, "top5": %, "n": int}`` (+ ``"preds"``).

    data: a data spec string (``PATH[START:STOP]``, preprocessed with the model's ModelMeta), a Dataset
      yielding ``(image, label)``, or a tuple of tensors ``(x, y)`` already in model input space.
    return_preds: add ``"preds"``, the top-1 class per sample (to compare FP32 and quantized models), and
      ``"hits"``, 1 where it is the label and 0 elsewhere (to compare two models on the same images: ``mcnemar``).
    The model is run in eval mode and restored to its previous mode afterwards. device: where ``model`` is;
    on CUDA the images are loaded by worker processes into pinned memory (zsq.compute.loader_options).
    """
    if isinstance(data, (str, Path)):
        from zsq.data import load_dataset

        data = load_dataset(data, get_meta(model))
    elif isinstance(data, tuple):
        if len(data) != 2:
            raise ZsqError("tensor data must be a pair (x, y)")
        data = TensorDataset(*data)
    if not isinstance(data, Dataset):
        raise ZsqError(f"data must be a path, a Dataset or an (x, y) pair, got {type(data).__name__}")
    n_total = len(data)
    if n_total == 0:
        raise ZsqError("no images to evaluate")
    from zsq.quant.calibration import check_calibrated

    check_calibrated(model)  # a float model has no activation quantizers and passes
    bs = batch_size or default_batch_size(model)
    loading = loader_options(device)  # CUDA: worker processes + pinned memory; CPU: as before
    # a generator of its own: a DataLoader otherwise draws its base seed from the global RNG
    loader = DataLoader(data, batch_size=bs, shuffle=False, generator=torch.Generator(), **loading)
    non_blocking = bool(loading.get("pin_memory"))
    was_training = model.training
    model.eval()
    correct1 = correct5 = n = 0
    preds, hits = [], []
    try:
        with torch.inference_mode():
            for x, y in progress(loader, total=len(loader), desc="evaluate"):
                x, y = x.to(device, non_blocking=non_blocking), torch.as_tensor(y).to(device, non_blocking=non_blocking)
                logits = model(x)
                if not bool(torch.isfinite(logits).all()):
                    raise ZsqError(f"the model gives NaN or inf outputs (images {n}..{n + len(x) - 1}); "
                                   "its weights or quantization ranges are broken")
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit = top.eq(y.view(-1, 1))
                correct1 += int(hit[:, 0].sum())
                correct5 += int(hit.any(dim=1).sum())
                n += y.numel()
                if return_preds:
                    preds.extend(top[:, 0].tolist())
                    hits.extend(hit[:, 0].int().tolist())
    finally:
        model.train(was_training)
    out = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n}
    if return_preds:
        out["preds"], out["hits"] = preds, hits
    return out


def mcnemar(hits_a, hits_b) -> Tuple[int, int, float]:
    """(only a right, only b right, exact two-sided p) for two models' 0/1 hits on the same images: the paired
    test, far tighter than comparing two accuracies' intervals when the models agree on most images."""
    if len(hits_a) != len(hits_b):
        raise ZsqError(f"paired comparison: {len(hits_a)} against {len(hits_b)} images (different image sets)")
    n10 = sum(1 for x, y in zip(hits_a, hits_b) if x and not y)
    n01 = sum(1 for x, y in zip(hits_a, hits_b) if y and not x)
    m = n10 + n01
    if m == 0:
        return n10, n01, 1.0
    tail = sum(math.comb(m, i) for i in range(min(n10, n01) + 1)) / 2 ** m
    return n10, n01, min(1.0, 2 * tail)


def agreement(preds_a, preds_b) -> float:
    """Percentage of samples where two models' top-1 predictions agree."""
    if len(preds_a) != len(preds_b) or not len(preds_a):
        raise ZsqError("prediction lists must be non-empty and of equal length")
    return 100.0 * sum(int(a == b) for a, b in zip(preds_a, preds_b)) / len(preds_a)
