"""GPTQ rounding of a unit's weights (Frantar et al., ICLR 2023; OBQ, NeurIPS 2022), for convs and linears.

Learned soft bits need thousands of steps to settle at 0 or 1; at a CPU budget of 50-100 steps per unit
most of what they learned is lost when they are hardened (benchmarks/results/imagenet_quality.md, "what
hardening costs"). GPTQ rounds in closed form instead: column by column, each weight is rounded to the
grid and the error it leaves is pushed onto the columns not yet rounded, weighted by the inverse of the
layer's input second moments H = E[x x^T] (the Hessian of its output error). It reads the inputs once and
has nothing to harden. The grid (step and zero point per output channel) is the layer's own; only the
integer codes are chosen here. A grouped or depthwise conv has one H per group (its own input channels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.errors import ZsqError
from zsq.hooks import Hooks
from zsq.quant.quantizer import UniformQuantizer, fake_quantize

UNFOLD_VALUES = 1 << 25  # input patches unfolded at a time (128 MiB of float32)


@dataclass(frozen=True)
class GPTQStats:
    """One layer's output error on its calibration inputs, tr((W - Q) H (W - Q)^T), before and after."""

    layer: str
    nearest_error: float
    gptq_error: float


def _padding(conv: nn.Conv2d):
    if conv.padding_mode != "zeros":
        raise ZsqError(f"GPTQ rounding supports zero-padded convs only; {type(conv).__name__} uses "
                       f"padding_mode={conv.padding_mode!r}: use --set rounding=learned")
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        if any(s != 1 for s in conv.stride) or any((d * (k - 1)) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
            raise ZsqError("GPTQ rounding supports padding='same' only with stride 1 and odd kernels: "
                           "use --set rounding=learned")
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return conv.padding


def _input_rows(layer: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The layer's input as rows of its weight's columns, per group: [G, rows, D] pieces."""
    x = x.detach().float()
    if isinstance(layer, nn.Linear):
        return [x.reshape(1, -1, x.shape[-1])]
    if not isinstance(layer, nn.Conv2d):
        raise ZsqError(f"GPTQ rounding supports Conv2d and Linear layers, not {type(layer).__name__}")
    g, d = layer.groups, layer.weight[0].numel()
    per_image = g * d * max(1, (x.shape[-1] * x.shape[-2]) // (layer.stride[0] * layer.stride[1]))
    step = max(1, UNFOLD_VALUES // per_image)
    out = []
    for i in range(0, x.shape[0], step):
        cols = F.unfold(x[i:i + step], layer.kernel_size, layer.dilation, _padding(layer), layer.stride)
        n, _, length = cols.shape  # channels outermost (c, kh, kw): the order of weight.reshape(C_out, -1)
        out.append(cols.reshape(n, g, d, length).permute(1, 0, 3, 2).reshape(g, n * length, d))
    return out


def _check_rows(name: str, layer: nn.Module, pieces: List[torch.Tensor], out: torch.Tensor) -> None:
    """The rows rebuilt from the input must give the layer's own output (else H would be of the wrong
    thing: a conv that pads or reshapes inside its own forward). Checked on the first call."""
    w = layer.quantized_weight().detach().float()
    groups = pieces[0].shape[0]
    w = w.reshape(groups, w.shape[0] // groups, -1)
    y = torch.cat([torch.einsum("grd,gkd->grk", rows, w) for rows in pieces], 1)  # [G, rows, R]
    bias = layer.quantized_bias() if hasattr(layer, "quantized_bias") else layer.bias
    tol = 1e-3 if out.dtype in (torch.float32, torch.float64) else 3e-2  # bf16 autocast: 8 mantissa bits
    out = out.detach().float()
    if isinstance(layer, nn.Linear):
        ref = out.reshape(1, -1, out.shape[-1])
    else:
        n, c = out.shape[:2]
        ref = out.reshape(n, groups, c // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, c // groups)
    if bias is not None:
        y = y + bias.detach().float().reshape(groups, 1, -1)
    if ref.shape != y.shape or not torch.allclose(y, ref, rtol=tol, atol=tol * float(ref.abs().max()) + 1e-6):
        raise ZsqError(f"GPTQ rounding: {name} ({type(layer).__name__}) computes something other than a plain "
                       "conv/linear of its input (padding or reshaping inside its forward?): use --set rounding=learned")


@torch.no_grad()
def input_hessian(layer: nn.Module, run: Callable[[], None], name: str = "layer") -> torch.Tensor:
    """E[x x^T] of the layer's input (after its own input quantizer) over what ``run`` feeds it: [G, D, D]."""
    acc = {"h": None, "n": 0}

    def post(mod, args, out):
        x = args[0]
        if getattr(mod, "input_quant", None) is not None:
            x = mod.input_quant(x)
        if acc["h"] is None:  # on one image: the check's output rows are as many as the layer's outputs
            _check_rows(name, mod, _input_rows(mod, x[:1]), out[:1])
        for rows in _input_rows(mod, x):
            h = torch.einsum("grd,gre->gde", rows.double(), rows.double())
            acc["h"] = h if acc["h"] is None else acc["h"] + h
            acc["n"] += rows.shape[1]

    with Hooks() as hooks:
        hooks.post(layer, post)
        run()
    if acc["h"] is None:
        raise ZsqError(f"GPTQ rounding: {name} was not called on the calibration images")
    return acc["h"] / acc["n"]


def _weight_grid(layer: nn.Module):
    wq = layer.weight_quant
    if not isinstance(wq, UniformQuantizer) or wq.spec.dynamic or not bool(wq.initialized):
        raise ZsqError("GPTQ rounding needs a static, initialised weight grid (a PTQ preset such as genie)")
    s, z = wq.qparams(layer.weight)
    c_out = layer.weight.shape[0]
    return s.detach().double().expand(c_out, *s.shape[1:]).reshape(c_out, 1), \
        z.detach().double().expand(c_out, *z.shape[1:]).reshape(c_out, 1), wq.qmin, wq.qmax


def _error(diff: torch.Tensor, h: torch.Tensor) -> float:
    """sum over groups of tr(diff H diff^T): the output's squared error summed over output channels."""
    return float(torch.einsum("grd,gde,gre->", diff, h, diff))


def gptq_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
               damp: float = 0.01) -> torch.Tensor:
    """GPTQ-rounded weights (on the grid) for w: [G, R, D] rows per group, h: [G, D, D], scale and zero: [G, R, 1].
    Columns go in order of decreasing H diagonal (act-order); a column no input reaches is set to zero."""
    w, h = w.double().clone(), h.double().clone()
    g, r, d = w.shape
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    w.masked_fill_(dead[:, None, :], 0.0)
    perm = torch.argsort(diag, dim=1, descending=True)
    w = torch.gather(w, 2, perm[:, None, :].expand(g, r, d))
    h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand(g, d, d)), 2, perm[:, None, :].expand(g, d, d))
    eye = torch.eye(d, dtype=h.dtype)
    for k in range(8):  # more damping until H is positive definite
        lam = damp * (10 ** k) * torch.diagonal(h, dim1=1, dim2=2).mean(1)
        chol, info = torch.linalg.cholesky_ex(h + lam[:, None, None] * eye)
        if not bool(info.any()):
            break
    else:
        raise ZsqError("GPTQ rounding: the layer's input second-moment matrix is not positive definite")
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    q = torch.empty_like(w)
    for i in range(d):
        col = w[:, :, i]
        qc = fake_quantize(col, scale[..., 0], zero[..., 0], qmin, qmax)
        q[:, :, i] = qc
        err = (col - qc) / u[:, i, i][:, None]
        w[:, :, i + 1:] -= err[:, :, None] * u[:, None, i, i + 1:]
    out = torch.empty_like(q)
    out.scatter_(2, perm[:, None, :].expand(g, r, d), q)
    return out


@torch.no_grad()
def gptq_round_layer(name: str, layer: nn.Module, run: Callable[[], None], damp: float = 0.01) -> GPTQStats:
    """Write GPTQ-rounded weights (on the layer's grid, which stays as it is) into ``layer.weight``."""
    h = input_hessian(layer, run, name)
    scale, zero, qmin, qmax = _weight_grid(layer)
    groups = h.shape[0]
    w = layer.weight.detach().double().reshape(groups, layer.weight.shape[0] // groups, -1)
    s, z = scale.reshape(groups, -1, 1), zero.reshape(groups, -1, 1)
    q = gptq_codes(w, h, s, z, qmin, qmax, damp)
    nearest = fake_quantize(w, s, z, qmin, qmax)
    stats = GPTQStats(name, _error(w - nearest, h), _error(w - q, h))
    layer.weight.copy_(q.reshape(layer.weight.shape).to(layer.weight.dtype))
    return stats


def call_order(layers: List[Tuple[str, nn.Module]], run: Callable[[], None]) -> List[Tuple[str, nn.Module]]:
    """The layers in the order ``run`` first calls them (module order need not be forward order)."""
    seen: List[int] = []
    with Hooks() as hooks:
        for i, (_, layer) in enumerate(layers):
            hooks.pre(layer, lambda _m, _a, i=i: seen.append(i) if i not in seen else None)
        run()
    missing = [layers[i][0] for i in range(len(layers)) if i not in seen]
    if missing:
        raise ZsqError(f"GPTQ rounding: {', '.join(missing)} not called on the calibration images")
    return [layers[i] for i in seen]


def gptq_round_unit(layers: List[Tuple[str, nn.Module]], run: Callable[[], None],
                    damp: float = 0.01) -> List[GPTQStats]:
    """Each of a unit's (name, layer) in forward order, each on the inputs it gets with the layers before it
    already rounded; ``run`` feeds the unit its calibration inputs."""
    with torch.no_grad():
        ordered = call_order(layers, run)
    return [gptq_round_layer(n, layer, run, damp) for n, layer in ordered]
