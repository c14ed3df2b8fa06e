"""Uniform fake quantizer for 2-8 bits: the one place where values are put on an integer grid.

Grid conventions (what papers disagree on, pinned here):
- asymmetric: codes q in [0, 2^b-1], x_hat = (q - z) * s, zero point z an integer, so 0 is exact;
  range [lo, hi] always includes 0 (lo = min(m, 0), hi = max(M, 0)), s = (hi - lo)/(2^b - 1).
- symmetric signed: q in [-2^(b-1), 2^(b-1)-1], z = 0, s = 2*amax/(2^b - 1) (Genie's convention).
- symmetric unsigned: q in [0, 2^b-1], z = 0, s = amax/(2^b - 1).
Rounding uses a straight-through estimator. With ``ste="clip"`` (LSQ) clipped inputs get no gradient
and the step gets the LSQ gradient (without LSQ's 1/sqrt(N*Qp) scaling); with ``ste="identity"``
(GDFQ/AIT/HAST) the gradient passes to the input everywhere and the step gets none.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict, replace
from typing import Optional, Tuple

import torch
import torch.nn as nn

from zsq.compute import fp32_region
from zsq.errors import ZsqError

OBSERVERS = ("minmax", "percentile", "lp", "ema")
LP_SAMPLE = 1 << 18  # values an activation Lp search looks at (per-tensor), and kept per observed batch
QUANTILE_SAMPLE = 1 << 24  # torch.quantile's input limit
STE_MODES = ("clip", "identity")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Validated on construction.

    signed: only for symmetric grids; None means "decide from the data at initialisation" (signed iff
      negatives are seen, as Genie's activation quantizer does).
    observer: how the range is initialised -- minmax, percentile (of |x| tails), lp (search over
      ``lp_ratios`` clip ratios minimising mean |x - Q(x)|^p, Genie uses p=2.4 over 100 ratios) or
      ema (GDFQ's EMA of batch min/max, with its bias correction when ``ema_bias_correction``).
    dynamic: recompute the range from the tensor on every forward (GDFQ's weights).
    learnable: the step size is an nn.Parameter trained with the LSQ gradient.
    """

    bits: int = 8
    symmetric: bool = False
    signed: Optional[bool] = None
    per_channel: bool = False
    ch_axis: int = 0
    observer: str = "minmax"
    percentile: float = 99.99
    lp_p: float = 2.4
    lp_ratios: int = 100
    ema_momentum: float = 0.9
    ema_bias_correction: bool = True
    dynamic: bool = False
    learnable: bool = False
    ste: str = "clip"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ZsqError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.observer not in OBSERVERS:
            raise ZsqError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.ste not in STE_MODES:
            raise ZsqError(f"ste must be one of {STE_MODES}, got {self.ste!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ZsqError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.lp_ratios < 1 or self.lp_p <= 0:
            raise ZsqError("lp search needs lp_ratios >= 1 and lp_p > 0")
        if not 0.0 < self.ema_momentum < 1.0:
            raise ZsqError(f"ema_momentum must be in (0, 1), got {self.ema_momentum}")
        if not self.symmetric and self.signed is not None:
            raise ZsqError("signed applies to symmetric grids only (asymmetric grids use a zero point)")

    def with_bits(self, bits: int) -> "QuantSpec":
        return replace(self, bits=bits)

    def to_dict(self) -> dict:
        return asdict(self)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (exactly), identity backward."""
    return torch.round(x).detach() + (x - x.detach())


def grid_limits(bits: int, symmetric: bool, signed: bool) -> Tuple[int, int]:
    """Integer code range (qmin, qmax) of a grid."""
    if symmetric and signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  ste: str = "clip") -> torch.Tensor:
    """x_hat = (clamp(round(x/s) + z, qmin, qmax) - z) * s, with the chosen straight-through gradient.

    The arithmetic is ONNX QuantizeLinear's, operation for operation: round(x / s) is taken *before*
    z is added. round(x/s + z) is the same in exact arithmetic but not in float32 -- near a .5 tie the
    sum rounds on z's coarser ulp grid -- and one flipped code early in a deep 4-bit network changes
    many later ones, so the deployed graph would disagree with this model on whole images.
    ``scale``/``zero_point`` broadcast against ``x`` (shape them for per-channel use); z holds integers.
    """
    lo, hi = qmin - zero_point, qmax - zero_point  # integer bounds of round(x/s), exact in float
    if ste == "identity":
        with torch.no_grad():
            xq = torch.round(torch.clamp(x / scale, lo, hi)) * scale
        return xq + (x - x.detach())  # value exactly xq, gradient identity
    if zero_point.requires_grad or not torch.is_grad_enabled():
        if not (x.requires_grad or scale.requires_grad or zero_point.requires_grad):
            return torch.round(torch.clamp(x / scale, lo, hi)) * scale  # round_ste's value, without its graph
        return round_ste(torch.clamp(x / scale, lo, hi)) * scale
    if not (x.requires_grad or scale.requires_grad):
        return torch.round(torch.clamp(x / scale, lo, hi)) * scale
    return LSQFakeQuant.apply(x, scale, lo, hi)


class LSQFakeQuant(torch.autograd.Function):
    """round_ste(clamp(x / s, lo, hi)) * s with the gradients autograd derives for it, bit for bit, in
    fewer full-size passes: autograd's clamp backward is a ``where`` (tens of times slower than a multiply
    on some CPU builds, measured in benchmarks/results/recon_step.md) and it keeps five tensors per call; this keeps
    x / s and multiplies by a float 1 / 0.5 / 0 mask (equal values: where(m, g, 0) and g * m differ at most in the
    sign of a zero). The operations and their order are autograd's (mul backward, clamp's mask, div's
    -g * ((x / s) / s), summed to s's shape), so forward values and both gradients equal the unfused formula."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi):
        v = x / scale
        r = torch.round(torch.clamp(v, lo, hi))
        ctx.save_for_backward(v, scale, lo, hi)
        ctx.scale_grad = scale.requires_grad
        return r * scale

    @staticmethod
    def backward(ctx, g):
        v, scale, lo, hi = ctx.saved_tensors
        # clamp with tensor bounds passes the gradient where lo < v < hi, half of it where v equals a bound
        # (the other half goes to the bound; here none needs it): (sign(v - lo) + 1)(sign(hi - v) + 1) / 4
        # is that 1 / 0.5 / 0 mask in float arithmetic
        mask = torch.sign(v - lo).add_(1.0).mul_(torch.sign(hi - v).add_(1.0)).mul_(0.25)
        grad_v = (g * scale) * mask
        u = torch.clamp(v, lo, hi)
        grad_x = grad_v / scale if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.scale_grad:
            grad_s = (g * torch.round(u)).sum_to_size(scale.shape) + (-grad_v * (v / scale)).sum_to_size(scale.shape)
        return grad_x, grad_s, None, None


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                    qmax: int) -> torch.Tensor:
    """Integer codes (int32) of x on the grid; what an integer kernel / export stores."""
    with torch.no_grad():  # the same arithmetic as fake_quantize, so codes reproduce its output exactly
        v = torch.clamp(x / scale, qmin - zero_point, qmax - zero_point)
        return (torch.round(v) + zero_point).to(torch.int32)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                       signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point for a range; the range is widened to contain 0 so that 0 is exact."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    levels = 2 ** bits - 1
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax * (2.0 if signed else 1.0) / levels
        scale = torch.clamp(scale, min=1e-8)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / levels, min=1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels)
    return scale, zero_point


def _channel_view(t: torch.Tensor, x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return t.reshape(shape)


def _flatten_channels(x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)


class UniformQuantizer(nn.Module):
    """Fake-quantizes a tensor on a uniform grid; holds the step/zero point and how to find them.

    States: ``enabled`` (quantize in forward) and ``observing`` (update the range from each input).
    Calibration: ``observing=True, enabled=False``, run data, then ``freeze()``. GDFQ's live EMA:
    ``observing=True, enabled=True``. A quantizer that is enabled but never initialised
    initialises itself from its first input (Genie's lazy initialisation) only while ``lazy_init`` is
    on: right for a weight (its range is the weight's own), wrong for an activation, whose range would
    be whatever batch came first. ``quantize_model`` turns it off on activation quantizers, which then
    refuse a forward before a calibration unless zsq opens an explicit observe context
    (``zsq.quant.state.lazy_init_allowed``, ``observing``).
    """

    def __init__(self, spec: QuantSpec, num_channels: Optional[int] = None):
        super().__init__()
        if spec.per_channel and not num_channels:
            raise ValueError("per-channel quantizer needs num_channels")
        self.spec = spec
        shape = (num_channels,) if spec.per_channel else ()
        scale = torch.ones(shape)
        if spec.learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape))
        # signed grid decided at init when spec.signed is None (stored so a reload reproduces it)
        self.register_buffer("signed_flag", torch.tensor(bool(spec.signed) if spec.signed is not None else False))
        self.register_buffer("initialized", torch.tensor(False))
        # observer state
        self.register_buffer("obs_min", torch.full(shape, float("inf")))
        self.register_buffer("obs_max", torch.full(shape, float("-inf")))
        self.register_buffer("ema_beta_t", torch.tensor(1.0))
        self._samples: list = []  # for percentile/lp over several batches (not saved)
        self.enabled = True
        self.observing = False
        self.pinned = False  # range fixed by pin_range (not saved: quantize_model pins again)
        self.lazy_init = True  # may take its range from its first input (see the class docstring)
        self.site_name = ""  # where it sits in the model, for the error an uncalibrated forward raises
        self.sample_seed = 0  # seeds the subsamples range searches see (zsq.quant.state.observing sets it)

    # ---- grid -------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def signed(self) -> bool:
        return bool(self.signed_flag) if self.spec.symmetric else False

    @property
    def qmin(self) -> int:
        return grid_limits(self.spec.bits, self.spec.symmetric, self.signed)[0]

    @property
    def qmax(self) -> int:
        return grid_limits(self.spec.bits, self.spec.symmetric, self.signed)[1]

    def extra_repr(self) -> str:
        s = self.spec
        kind = "sym" if s.symmetric else "asym"
        gran = "per-channel" if s.per_channel else "per-tensor"
        return f"bits={s.bits}, {kind}, {gran}, observer={s.observer}, learnable={s.learnable}"

    # ---- range initialisation ---------------------------------------------------------------
    def _decide_sign(self, x: torch.Tensor) -> None:
        if self.spec.symmetric and self.spec.signed is None:
            self.signed_flag.fill_(bool((x.min() < 0).item()))

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor, signed: Optional[bool] = None) -> None:
        """Set step/zero point from an explicit range (e.g. one derived from BN statistics); a
        pinned quantizer keeps its range."""
        if self.pinned:
            return
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(self.scale.shape)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(self.scale.shape)
        if self.spec.symmetric and self.spec.signed is None:
            self.signed_flag.fill_(bool(signed) if signed is not None else bool((lo < 0).any().item()))
        scale, zp = qparams_from_range(lo, hi, self.spec.bits, self.spec.symmetric, self.signed)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zp)
        self.initialized.fill_(True)

    def pin_range(self, lo: float, hi: float) -> None:
        """Fix the range for good (the image input's known range): calibration, lazy initialisation
        and step-size training leave it alone from now on."""
        self.pinned = False
        self.set_range(torch.tensor(lo), torch.tensor(hi))
        self.pinned = True
        if isinstance(self.scale, nn.Parameter):
            self.scale.requires_grad_(False)

    def init_from(self, x: torch.Tensor) -> None:
        """Initialise step/zero point from one tensor with the spec's observer (not EMA)."""
        if self.pinned:
            return
        x = x.detach()
        self._decide_sign(x)
        if self.spec.observer == "lp":
            if not self.spec.per_channel:
                # the search sees the true range, at a fraction of the cost on full feature maps
                x = subsample_with_extremes(x, LP_SAMPLE, self.sample_seed)
            scale, zp = lp_search(x, self.spec, self.signed)
            with torch.no_grad():
                self.scale.copy_(scale.reshape(self.scale.shape))
                self.zero_point.copy_(zp.reshape(self.zero_point.shape))
            self.initialized.fill_(True)
            return
        lo, hi = tensor_range(x, self.spec, self.sample_seed)
        self.set_range(lo, hi, signed=self.signed)

    def _observe(self, x: torch.Tensor) -> None:
        if self.pinned:
            return
        x = x.detach()
        s = self.spec
        if s.observer == "ema":
            lo, hi = _minmax(x, s)
            if not bool(self.initialized) and self.ema_beta_t.item() == 1.0 and not s.ema_bias_correction:
                self.obs_min.copy_(lo)
                self.obs_max.copy_(hi)
            else:
                if s.ema_bias_correction:
                    # GDFQ's rule, applied to the stored state (inflates early ranges; GDFQ's quantization_utils)
                    self.ema_beta_t.mul_(s.ema_momentum)
                    denom = 1.0 - self.ema_beta_t
                    base_min = torch.where(torch.isfinite(self.obs_min), self.obs_min, torch.zeros_like(lo))
                    base_max = torch.where(torch.isfinite(self.obs_max), self.obs_max, torch.zeros_like(hi))
                    self.obs_min.copy_((s.ema_momentum * base_min + (1 - s.ema_momentum) * lo) / denom)
                    self.obs_max.copy_((s.ema_momentum * base_max + (1 - s.ema_momentum) * hi) / denom)
                else:
                    self.ema_beta_t.mul_(s.ema_momentum)
                    self.obs_min.mul_(s.ema_momentum).add_((1 - s.ema_momentum) * lo)
                    self.obs_max.mul_(s.ema_momentum).add_((1 - s.ema_momentum) * hi)
            self._decide_sign(x)
            self.set_range(self.obs_min, self.obs_max, signed=self.signed if self.spec.symmetric else None)
            return
        if s.observer == "minmax":
            lo, hi = _minmax(x, s)
            self.obs_min.copy_(torch.minimum(self.obs_min, lo))
            self.obs_max.copy_(torch.maximum(self.obs_max, hi))
            if self.spec.symmetric and self.spec.signed is None:
                self.signed_flag.fill_(bool(self.signed_flag) or bool((x.min() < 0).item()))
            return
        # percentile / lp: keep a bounded sample of the values, decide at freeze()
        self._samples.append(_subsample(x, s, LP_SAMPLE, self.sample_seed))

    def freeze(self) -> None:
        """End calibration: compute the grid from what was observed, stop observing, enable."""
        s = self.spec
        if s.observer == "minmax" and torch.isfinite(self.obs_min).all():
            self.set_range(self.obs_min, self.obs_max, signed=self.signed if s.symmetric else None)
        elif s.observer in ("percentile", "lp") and self._samples:
            if s.per_channel:
                # samples are stored as (C, n): put the channels back on ch_axis
                x = torch.cat(self._samples, dim=1)
                x = x if s.ch_axis == 0 else x.transpose(0, s.ch_axis)
            else:
                x = torch.cat([t.flatten() for t in self._samples])
            self.init_from(x)
            self._samples = []
        self.observing = False
        self.enabled = True

    def reset_observer(self) -> None:
        self.obs_min.fill_(float("inf"))
        self.obs_max.fill_(float("-inf"))
        self.ema_beta_t.fill_(1.0)
        self._samples = []

    # ---- forward ----------------------------------------------------------------------------
    def qparams(self, x: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point shaped to broadcast against x (dynamic specs derive them from x)."""
        if self.spec.dynamic:
            lo, hi = _minmax(x.detach(), self.spec)
            scale, zp = qparams_from_range(lo, hi, self.spec.bits, self.spec.symmetric, self.signed)
        else:
            scale, zp = self.scale, self.zero_point
        if self.spec.per_channel and x is not None:
            scale = _channel_view(scale, x, self.spec.ch_axis)
            zp = _channel_view(zp, x, self.spec.ch_axis)
        return scale, zp

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x (int32), on this quantizer's grid."""
        scale, zp = self.qparams(x)
        return quantize_to_int(x, scale, zp, self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_region(x):  # under bf16 autocast the grid arithmetic still runs in float32
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()  # float64 stays float64 (the float-floor copy in zsq.export.parity)
            if self.observing:
                self._observe(x)
            if not self.enabled:
                return x
            if not self.spec.dynamic and not bool(self.initialized):
                if not (self.lazy_init or self.observing):  # observing: ranges from data on purpose
                    where = f" {self.site_name}" if self.site_name else ""
                    raise ZsqError(f"the quantized model is not calibrated: activation quantizer{where} has no "
                                   "range; run zsq.quant.calibrate(model, images) or calibrate_from_bn(model) "
                                   "first, or take ranges from data on purpose inside "
                                   "zsq.quant.state.lazy_init_allowed(model)")
                self.init_from(x)
            scale, zp = self.qparams(x)
            return fake_quantize(x, scale, zp, self.qmin, self.qmax, self.spec.ste)


# ---- range estimators -----------------------------------------------------------------------
def _minmax(x: torch.Tensor, spec: QuantSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    if spec.per_channel:
        flat = _flatten_channels(x, spec.ch_axis)
        return flat.min(dim=1).values, flat.max(dim=1).values
    return x.min(), x.max()


def sample_indices(n: int, cap: int, seed: int = 0) -> torch.Tensor:
    """``cap`` of ``range(n)`` without replacement, drawn from their own generator seeded with ``seed``
    (the run's seed: a range search need not see every value, and must not touch the global RNG)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap]


def subsample_with_extremes(x: torch.Tensor, cap: int, seed: int = 0) -> torch.Tensor:
    """``x`` itself when it has at most ``cap`` values, else a seeded subsample of ``cap`` values plus
    the exact min and max (so sign and range stay exact), flattened."""
    if x.numel() <= cap:
        return x
    flat = x.flatten()
    return torch.cat([flat[sample_indices(flat.numel(), cap, seed)], flat.min().reshape(1), flat.max().reshape(1)])


def _subsample(x: torch.Tensor, spec: QuantSpec, cap: int, seed: int = 0) -> torch.Tensor:
    if spec.per_channel:
        flat = _flatten_channels(x, spec.ch_axis)
        if flat.shape[1] > cap:
            flat = flat[:, sample_indices(flat.shape[1], cap, seed)]
        return flat
    flat = x.flatten()
    if flat.numel() > cap:
        flat = flat[sample_indices(flat.numel(), cap, seed)]
    return flat


def tensor_range(x: torch.Tensor, spec: QuantSpec, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Range of x by the spec's observer (minmax/ema -> min/max; percentile -> tails)."""
    if spec.observer != "percentile":
        return _minmax(x, spec)
    q_hi = spec.percentile / 100.0
    q_lo = 1.0 - q_hi
    if spec.per_channel:
        flat = _flatten_channels(x, spec.ch_axis).float()
        return torch.quantile(flat, q_lo, dim=1), torch.quantile(flat, q_hi, dim=1)
    flat = x.flatten().float()
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[sample_indices(flat.numel(), QUANTILE_SAMPLE, seed)]
    return torch.quantile(flat, q_lo), torch.quantile(flat, q_hi)


def lp_search(x: torch.Tensor, spec: QuantSpec, signed: bool, coarse_step: int = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Genie's clip search: for r in 1.00, 0.99, ..., scale the range by r and keep the step with the
    smallest mean |x - Q(x)|^p (per channel when per_channel; ties keep the larger r).

    Searched coarse-to-fine (every ``coarse_step``-th ratio, then all ratios around each channel's best),
    which evaluates ~30 instead of 100 candidates and finds the full grid's answer whenever the error
    curve has one valley within ``coarse_step`` ratios (tested); ``coarse_step=1`` is the plain full grid.
    """
    bits, p, n = spec.bits, spec.lp_p, spec.lp_ratios
    flat = _flatten_channels(x, spec.ch_axis) if spec.per_channel else x.reshape(1, -1)
    flat = flat.float()
    lo = torch.clamp(flat.min(dim=1).values, max=0.0)
    hi = torch.clamp(flat.max(dim=1).values, min=0.0)
    qmin, qmax = grid_limits(bits, spec.symmetric, signed)
    best_score = torch.full_like(lo, float("inf"))
    best_idx = torch.zeros_like(lo, dtype=torch.long)

    def consider(idx: torch.Tensor):
        nonlocal best_score, best_idx
        r = 1.0 - idx.to(lo.dtype) / n
        scale, zp = qparams_from_range(lo * r, hi * r, bits, spec.symmetric, signed)
        q = torch.clamp(torch.round(flat / scale[:, None]) + zp[:, None], qmin, qmax)
        err = (flat - (q - zp[:, None]) * scale[:, None]).abs_().pow_(p).mean(dim=1)
        better = err < best_score
        best_score = torch.where(better, err, best_score)
        best_idx = torch.where(better, idx, best_idx)

    step = max(1, min(coarse_step, n))
    for i in range(0, n, step):
        consider(torch.full_like(best_idx, i))
    if step > 1:
        centre = best_idx.clone()
        for off in range(-(step - 1), step):
            idx = torch.clamp(centre + off, 0, n - 1)
            consider(idx)
    r = 1.0 - best_idx.to(lo.dtype) / n
    scale, zp = qparams_from_range(lo * r, hi * r, bits, spec.symmetric, signed)
    if not spec.per_channel:
        return scale[0], zp[0]
    return scale, zp
