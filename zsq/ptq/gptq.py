"""GPTQ rounding of a unit's weights (Frantar et al., ICLR 2023; OBQ, NeurIPS 2022), for convs and linears.

Learned soft bits need thousands of steps to settle at 0 or 1; at a CPU budget of 50-100 steps per unit
most of what they learned is lost when they are hardened (benchmarks/results/imagenet_quality.md, "what
hardening costs"). GPTQ rounds in closed form instead: column by column, each weight is rounded to the
grid and the error it leaves is pushed onto the columns not yet rounded, weighted by the inverse of the
layer's input second moments H = E[x x^T] (the Hessian of its output error). It reads the inputs once and
has nothing to harden. The grid (step and zero point per output channel) is the layer's own; only the
integer codes are chosen here. A grouped or depthwise conv has one H per group (its own input channels).
Plain GPTQ fits W x_q, the float weights on the quantized input; with the layer's float twin fed the float
input (``fp_layer``) the weights are first mapped to the best fit of the float output from x_q
(``float_target``), so that each layer also corrects the error the quantized chain delivers to it, as block
reconstruction does (on Lite0 W4A8 that is what made GPTQ pay: imagenet_quality.md, section "2026-12-05 (e)").
The same machinery also hardens learned soft bits (``gptq_harden_unit``): the soft unit is then the twin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from zsq.errors import ZsqError
from zsq.hooks import Hooks
from zsq.ptq.soft_round import SoftRoundQuantizer, to_uniform
from zsq.quant.quantizer import UniformQuantizer, fake_quantize

UNFOLD_VALUES = 1 << 25  # input patches unfolded at a time (128 MiB of float32)


@dataclass(frozen=True)
class GPTQStats:
    """One layer's output error on its calibration inputs (E||W x - Q x_q||^2 summed over channels, x the
    float input with a float twin, else x_q) with round-to-nearest Q and with GPTQ's."""

    layer: str
    nearest_error: float
    gptq_error: float


@dataclass(frozen=True)
class ConvCall:
    """One conv2d/linear call as the layer's forward made it: the input the kernel really saw (after the
    layer's own input quantizer and whatever padding its forward or padding_mode added), the weight it was
    given, the call's geometry and its output. GPTQ's rows come from this, not from the layer's argument:
    timm's Conv2dSame, TF-ported EfficientNets and a user's SAME-padding subclass pad inside ``forward``."""

    linear: bool
    input: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: Tuple[int, int] = (1, 1)
    padding: Union[Tuple[int, int], str] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    output: Optional[torch.Tensor] = None


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(t) for t in v)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv_call(func, args, kwargs, out) -> Optional[ConvCall]:
    """The call as a ConvCall if it is a 2-D convolution or a linear map, else None."""
    if func in _LINEAR_FUNCS:
        named = dict(zip(("input", "weight", "bias"), args), **kwargs)
        return ConvCall(True, named["input"], named["weight"], named.get("bias"), output=out)
    if func not in _CONV_FUNCS:
        return None
    named = dict(zip(_CONV_ARGS, args), **kwargs)
    pad = named.get("padding", 0)
    return ConvCall(False, named["input"], named["weight"], named.get("bias"), _pair(named.get("stride", 1)),
                    pad if isinstance(pad, str) else _pair(pad), _pair(named.get("dilation", 1)),
                    int(named.get("groups", 1)), out)


_CONV_FUNCS = (torch.conv2d, F.conv2d)
_LINEAR_FUNCS = (F.linear, torch._C._nn.linear)


class _CallRecorder(TorchFunctionMode):
    """Records the conv2d/linear calls made while one of the watched layers' forward runs (between its
    pre- and post-hook), so each layer's moments come from what its kernel really convolved."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.calls: List[ConvCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth:
            call = _conv_call(func, args, kwargs or {}, out)
            if call is not None:
                self.calls.append(call)
        return out


def _call_padding(call: ConvCall, kernel: Tuple[int, int]):
    if call.padding == "valid":
        return 0
    if call.padding == "same":  # PyTorch's padding="same": stride 1 only; an even kernel pads more at the end
        total = [d * (k - 1) for k, d in zip(kernel, call.dilation)]
        if all(t % 2 == 0 for t in total):
            return tuple(t // 2 for t in total)
        return None  # asymmetric: padded explicitly by _input_rows
    return call.padding


def _input_rows(call: ConvCall, x: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """The call's input (or ``x`` in its place) as rows of its weight's columns, per group: [G, rows, D]
    pieces of a few images each, one at a time (a 112² layer's rows for 64 images are gigabytes in float64)."""
    x = (call.input if x is None else x).detach().float()
    if call.linear:
        yield x.reshape(1, -1, x.shape[-1])
        return
    kernel = tuple(call.weight.shape[-2:])
    padding = _call_padding(call, kernel)
    if padding is None:
        total = [d * (k - 1) for k, d in zip(kernel, call.dilation)]
        x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = 0
    g, d = call.groups, call.weight[0].numel()
    per_image = g * d * max(1, (x.shape[-1] * x.shape[-2]) // (call.stride[0] * call.stride[1]))
    step = max(1, UNFOLD_VALUES // per_image)
    for i in range(0, x.shape[0], step):
        cols = F.unfold(x[i:i + step], kernel, call.dilation, padding, call.stride)
        n, _, length = cols.shape  # channels outermost (c, kh, kw): the order of weight.reshape(C_out, -1)
        yield cols.reshape(n, g, d, length).permute(1, 0, 3, 2).reshape(g, n * length, d)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.detach().float(), b.detach().float()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max()) + 1e-6))


def _tolerance(t: torch.Tensor) -> float:
    return 1e-3 if t.dtype in (torch.float32, torch.float64) else 3e-2  # bf16 autocast: 8 mantissa bits


def layer_call(name: str, layer: nn.Module, calls: List[ConvCall], out, weight: Optional[torch.Tensor] = None) \
        -> ConvCall:
    """The one conv/linear call of one forward of ``layer``, checked to be what the layer computes: a single
    call, on the layer's own (quantized) weight, whose output the layer returns. Anything else (a weight
    transformed in forward, two convs, work after the conv) cannot be rounded by GPTQ: ZsqError saying why."""
    what = f"GPTQ rounding: {name} ({type(layer).__name__})"
    if isinstance(layer, nn.Module) and not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise ZsqError(f"GPTQ rounding supports Conv2d and Linear layers, not {type(layer).__name__}")
    if len(calls) != 1:
        raise ZsqError(f"{what} makes {len(calls)} conv/linear calls in its forward, not one")
    call = calls[0]
    want = layer.quantized_weight() if weight is None and hasattr(layer, "quantized_weight") else \
        (layer.weight if weight is None else weight)
    if not _close(call.weight, want, 1e-5):
        raise ZsqError(f"{what} convolves a weight other than its own (transformed inside its forward)")
    if not torch.is_tensor(out) or not _close(out, call.output, _tolerance(call.output)):
        raise ZsqError(f"{what} computes something more than a conv/linear of its input (work after the "
                       "kernel inside its forward)")
    return call


def _check_rows(name: str, layer: nn.Module, call: ConvCall) -> None:
    """The rows rebuilt from the call's input must give the call's own output (else H would be of the wrong
    thing). Checked on the first call, on one image."""
    pieces = list(_input_rows(call, call.input[:1]))
    w = call.weight.detach().double()  # float64: bf16 autocast (around the forward) leaves it be
    groups = pieces[0].shape[0]
    w = w.reshape(groups, w.shape[0] // groups, -1)
    y = torch.cat([torch.einsum("grd,gkd->grk", rows.double(), w) for rows in pieces], 1).float()  # [G, rows, R]
    out = call.output[:1].detach().float()
    if call.linear:
        ref = out.reshape(1, -1, out.shape[-1])
    else:
        n, c = out.shape[:2]
        ref = out.reshape(n, groups, c // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, c // groups)
    if call.bias is not None:
        y = y + call.bias.detach().float().reshape(groups, 1, -1)
    if not _close(y, ref, _tolerance(call.output)):
        raise ZsqError(f"GPTQ rounding: {name} ({type(layer).__name__}) computes something other than a plain "
                       "conv/linear of its input: use --set rounding=learned")


def watch_calls(hooks: Hooks, recorder: _CallRecorder, layer: nn.Module, done: Callable) -> None:
    """Hooks that record ``layer``'s conv/linear calls into ``recorder`` and hand them, with the layer's
    output, to ``done(mod, calls, out)`` after each forward."""
    start: List[int] = []

    def pre(_mod, _args):
        start.append(len(recorder.calls))
        recorder.depth += 1

    def post(mod, _args, out):
        recorder.depth -= 1
        first = start.pop()
        calls = recorder.calls[first:]
        del recorder.calls[first:]
        done(mod, calls, out)

    hooks.pre(layer, pre)
    hooks.post(layer, post)


@dataclass
class Moments:
    """Second moments of a layer's input rows, per group [G, D, D]: h = E[x_q x_q^T] (the quantized model's
    input), and with a float twin c = E[x_fp x_q^T] and a = E[x_fp x_fp^T] (the float model's input)."""

    h: torch.Tensor
    c: Optional[torch.Tensor] = None
    a: Optional[torch.Tensor] = None


@torch.no_grad()
def input_moments(layer: nn.Module, run: Callable[[], None], name: str = "layer",
                  fp_layer: Optional[nn.Module] = None) -> Moments:
    """The moments of what ``layer``'s kernel convolves when ``run`` runs (its input after its own input
    quantizer and padding: ConvCall). With ``fp_layer`` (the same layer in the float model), ``run`` must
    call it on each chunk just before the layer itself on the matching chunk, so that their rows pair up.
    Rows are summed a piece at a time in float64."""
    acc = {"n": 0}
    fp_calls: List[ConvCall] = []  # the twin's calls not yet paired, oldest first
    sums = {}

    def add(key, t):
        sums[key] = t if key not in sums else sums[key] + t

    def fp_done(mod, calls, out):
        fp_calls.append(layer_call(f"{name}'s float twin", mod, calls, out, weight=calls[0].weight
                                   if len(calls) == 1 else None))

    def done(mod, calls, out):
        call = layer_call(name, mod, calls, out)
        if not sums:  # on one image: the check's output rows are as many as the layer's outputs
            _check_rows(name, mod, call)
        xf = None
        if fp_layer is not None:
            xf = fp_calls.pop(0).input if fp_calls else None
            if xf is None or xf.shape != call.input.shape:
                raise ZsqError(f"GPTQ rounding: {name}'s float twin did not see the same chunk just before it")
        pieces_f = _input_rows(call, xf) if xf is not None else None
        for rq in _input_rows(call):
            rq = rq.double()
            if pieces_f is not None:
                rf = next(pieces_f).double()
                add("c", torch.einsum("grd,gre->gde", rf, rq))
                add("a", torch.einsum("grd,gre->gde", rf, rf))
            add("h", torch.einsum("grd,gre->gde", rq, rq))
            acc["n"] += rq.shape[1]

    recorder = _CallRecorder()
    with Hooks() as hooks:
        watch_calls(hooks, recorder, layer, done)
        if fp_layer is not None:
            watch_calls(hooks, recorder, fp_layer, fp_done)
        with recorder:
            run()
    if not sums:
        raise ZsqError(f"GPTQ rounding: {name} was not called on the calibration images")
    if fp_calls:
        raise ZsqError(f"GPTQ rounding: {name}'s float twin was called more often than the layer itself")
    n = acc["n"]
    return Moments(sums["h"] / n, *((sums["c"] / n, sums["a"] / n) if fp_layer is not None else ()))


def _weight_grid(layer: nn.Module):
    wq = layer.weight_quant
    if not isinstance(wq, UniformQuantizer) or wq.spec.dynamic or not bool(wq.initialized):
        raise ZsqError("GPTQ rounding needs a static, initialised weight grid (a PTQ preset such as genie)")
    s, z = wq.qparams(layer.weight)
    c_out = layer.weight.shape[0]
    return s.detach().double().expand(c_out, *s.shape[1:]).reshape(c_out, 1), \
        z.detach().double().expand(c_out, *z.shape[1:]).reshape(c_out, 1), wq.qmin, wq.qmax


def _target_error(w: torch.Tensor, q: torch.Tensor, m: Moments) -> float:
    """E||W x_ref - Q x_q||^2 summed over output channels (x_ref = x_q without a float twin)."""
    quad = lambda u, mat, v: float(torch.einsum("grd,gde,gre->", u, mat, v))  # noqa: E731
    if m.c is None:
        return quad(w - q, m.h, w - q)
    return quad(w, m.a, w) - 2.0 * quad(w, m.c, q) + quad(q, m.h, q)


def _ridge(h: torch.Tensor, damp: float) -> torch.Tensor:
    """damp times each group's mean diagonal, as a [G, 1, 1] tensor (a group no input reaches: damp)."""
    mean = torch.diagonal(h, dim1=1, dim2=2).mean(1)
    return damp * torch.where(mean > 0, mean, torch.ones_like(mean))[:, None, None]


def float_target(w: torch.Tensor, m: Moments, damp: float) -> torch.Tensor:
    """The weights that best map the quantized input onto the float output: argmin_V E||W x_fp - V x_q||^2 +
    ridge ||V - W||^2 = W (C + ridge I)(H + ridge I)^-1. GPTQ rounds these, so each layer also corrects the
    error its quantized input carries (as block reconstruction does); the ridge pulls them back to W where
    the images say little (a classifier fed by few images)."""
    lam = _ridge(m.h, damp) * torch.eye(m.h.shape[-1], dtype=m.h.dtype)
    return torch.linalg.solve(m.h + lam, (w @ (m.c + lam)).transpose(1, 2)).transpose(1, 2)


def gptq_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
               damp: float = 0.01) -> torch.Tensor:
    """GPTQ-rounded weights (on the grid) for w: [G, R, D] rows per group, h: [G, D, D], scale and zero: [G, R, 1].
    Columns go in order of decreasing H diagonal (act-order). A column no calibration input reaches rounds to
    nearest (GPTQ's code sets it to zero, but other images may reach it)."""
    w, h = w.double().clone(), h.double().clone()
    g, r, d = w.shape
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)  # such a column passes no error on: it rounds to nearest
    perm = torch.argsort(diag, dim=1, descending=True)
    w = torch.gather(w, 2, perm[:, None, :].expand(g, r, d))
    h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand(g, d, d)), 2, perm[:, None, :].expand(g, d, d))
    eye = torch.eye(d, dtype=h.dtype)
    for k in range(8):  # more damping until H is positive definite
        chol, info = torch.linalg.cholesky_ex(h + _ridge(h, damp * 10 ** k) * eye)
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


def _write_codes(name: str, layer: nn.Module, weights: torch.Tensor, m: Moments, damp: float) -> GPTQStats:
    """GPTQ codes for ``weights`` (shaped as the layer's; mapped to float_target first when ``m`` has a twin's
    moments) on the layer's grid, written into ``layer.weight``; their error against round-to-nearest's."""
    scale, zero, qmin, qmax = _weight_grid(layer)
    groups = m.h.shape[0]
    w = weights.detach().double().reshape(groups, weights.shape[0] // groups, -1)
    s, z = scale.reshape(groups, -1, 1), zero.reshape(groups, -1, 1)
    q = gptq_codes(w if m.c is None else float_target(w, m, damp), m.h, s, z, qmin, qmax, damp)
    stats = GPTQStats(name, _target_error(w, fake_quantize(w, s, z, qmin, qmax), m), _target_error(w, q, m))
    layer.weight.copy_(q.reshape(layer.weight.shape).to(layer.weight.dtype))
    return stats


@torch.no_grad()
def gptq_round_layer(name: str, layer: nn.Module, run: Callable[[], None], damp: float = 0.01,
                     fp_layer: Optional[nn.Module] = None) -> GPTQStats:
    """Write GPTQ-rounded weights (on the layer's grid, which stays as it is) into ``layer.weight``. With
    ``fp_layer`` (see ``input_moments``) the target is the float layer's output on the float input."""
    m = input_moments(layer, run, name, fp_layer)
    return _write_codes(name, layer, layer.weight, m, damp)


@torch.no_grad()
def gptq_harden_layer(name: str, layer: nn.Module, run: Callable[[], None], soft_layer: nn.Module,
                      damp: float = 0.01) -> GPTQStats:
    """Harden a layer's trained soft bits with GPTQ instead of rounding each to nearest. ``soft_layer`` is the
    same layer in a copy of the unit that keeps its soft bits, and ``run`` calls that copy on each chunk just
    before the unit itself (see ``input_moments``). The target is the soft unit's own output, W_s x_s: the
    weights are first mapped to its best fit from the input the hardened layers before give (float_target,
    so each layer also takes up what hardening the earlier ones cost), then GPTQ picks their codes on the
    learned grid. Round-to-nearest of W_s is AdaRound's 1[V >= 0]; on short budgets the soft bits are far
    from 0 and 1 and that jump costs most of what a unit learned (imagenet_quality.md, "what hardening
    costs"). The layer leaves with a frozen UniformQuantizer; the stats' errors are E||W_s x_s - Q x_q||^2."""
    if not isinstance(layer.weight_quant, SoftRoundQuantizer):
        raise ZsqError(f"GPTQ hardening: {name} has no soft-rounded weights to harden")
    m = input_moments(layer, run, name, fp_layer=soft_layer)
    layer.weight_quant.hard = False
    soft_weights = layer.weight_quant(layer.weight).detach()
    to_uniform(layer)  # the learned grid as a frozen UniformQuantizer; GPTQ's codes replace its weights
    return _write_codes(name, layer, soft_weights, m, damp)


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


def gptq_harden_unit(layers: List[Tuple[str, nn.Module]], run: Callable[[], None], soft_layers: List[nn.Module],
                     damp: float = 0.01) -> List[GPTQStats]:
    """gptq_harden_layer for each of a unit's soft-rounded layers in forward order, each on the inputs it
    gets with the layers before it already hardened; ``soft_layers`` are their twins in a soft copy of the
    unit, in the same order as ``layers``, and ``run`` feeds that copy each chunk first."""
    twin = dict(zip([id(layer) for _, layer in layers], soft_layers))
    with torch.no_grad():
        ordered = call_order(layers, run)
    return [gptq_harden_layer(n, layer, run, twin[id(layer)], damp) for n, layer in ordered]


def gptq_round_unit(layers: List[Tuple[str, nn.Module]], run: Callable[[], None], damp: float = 0.01,
                    fp_layers: Optional[List[nn.Module]] = None) -> List[GPTQStats]:
    """Each of a unit's (name, layer) in forward order, each on the inputs it gets with the layers before it
    already rounded; ``run`` feeds the unit its calibration inputs (and, with ``fp_layers``, the float unit
    each chunk first: the layers' float twins, in the same order as ``layers``)."""
    twin = dict(zip([id(layer) for _, layer in layers], fp_layers or []))
    with torch.no_grad():
        ordered = call_order(layers, run)
    return [gptq_round_layer(n, layer, run, damp, twin.get(id(layer))) for n, layer in ordered]


@torch.no_grad()
def gptq_blockers(qmodel: nn.Module, example: torch.Tensor) -> Dict[str, str]:
    """{layer name: why GPTQ cannot round it} from one forward of ``example`` with quantizers off: the same
    checks (one conv/linear call on the layer's own weight, whose output the layer returns; rows that rebuild
    that output) as ``input_moments`` makes on the calibration images. Cheap, so a run decides on its
    rounding before synthesis and reconstruction start, not when the first unit reaches such a layer."""
    from zsq.quant.state import quantizers_disabled
    from zsq.quant.inventory import quant_layers

    layers = quant_layers(qmodel)
    names = {id(layer): name for name, layer in layers}
    blockers: Dict[str, str] = {}

    def done(mod, calls, out):
        name = names[id(mod)]
        try:
            _check_rows(name, mod, layer_call(name, mod, calls, out))
        except ZsqError as e:
            blockers.setdefault(name, str(e))

    recorder = _CallRecorder()
    with Hooks() as hooks, quantizers_disabled(qmodel):
        for _, layer in layers:
            watch_calls(hooks, recorder, layer, done)
        with recorder:
            qmodel(example)
    return blockers
