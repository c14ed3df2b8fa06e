"""DFQ (Nagel et al., ICCV 2019) as a float-model transform: BN folding, cross-layer equalization (CLE),
high-bias absorption (HBA), and the analytic bias correction (BC) applied after quantization.

Why: per-channel weight grids cannot fix the *input*-channel ranges of a layer, and depthwise networks
have very unequal ones; CLE moves a per-channel factor s_c from a conv's output channel c to the next
conv's input channel c -- exact through BN (folded), ReLU (f(s x) = s f(x)) and ReLU6 (its clip becomes
6/s_c per channel, ``ChannelClippedReLU``) -- so that both carry the range sqrt(r1_c r2_c). HBA moves the
part c = max(0, beta - 3|gamma|) of a pre-activation that is almost always positive through the ReLU into
the next layer's bias (narrower activation ranges). BC removes the mean output shift eps . E[x] that the
weight rounding error eps causes, with E[x] of the clipped normal that the producing BN predicts.

Pairs are found in the flattened fx graph (``zsq.quant.graph.flow_graph``): conv -> folded BN -> ReLU /
ReLU6 / nothing -> conv, every value read only by the next op of the chain (no fork, no residual add),
each module called once, the second conv plain or depthwise. Written from ``shared/specs/dfq.md``.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.errors import ZsqError
from zsq.quant import graph as G
from zsq.quant.modules import QUANT_LAYER_TYPES, ChannelClippedReLU, FoldedBatchNorm

logger = logging.getLogger(__name__)

RELU6_MODES = ("clip", "relu", "skip")
ABSORB_MODES = ("unpadded", "all", "none")
_PASS = (nn.Identity, nn.Dropout)


def _pass_kind(mod: Optional[nn.Module]) -> Optional[str]:
    """'same' for ops a channel scale passes unchanged (identity, dropout), 'pad' for zero padding (it
    passes too, but the padded zeros do not carry an absorbed bias), None otherwise."""
    if mod is None or isinstance(mod, FoldedBatchNorm):
        return None
    if isinstance(mod, _PASS):
        return "same"
    if isinstance(mod, nn.ZeroPad2d) or (isinstance(mod, nn.ConstantPad2d) and mod.value == 0) \
            or getattr(mod, "zsq_zero_pad", False):
        return "pad"
    return None


@dataclass
class Pair:
    """conv1 -> (bn) -> (act) -> conv2 in the flattened graph, by module name; act is a module name, or a
    "function:relu" for a functional ReLU, or None."""

    conv1: str
    conv2: str
    bn: Optional[str]
    act: Optional[str]
    padded: bool = False


@dataclass
class InputStats:
    """What the BN before a layer predicts of its input: pre-activation N(beta, gamma^2) per channel,
    then an activation clipping at 0 and at ``cap`` (inf: ReLU; None act: no clipping at all)."""

    bn: str
    act: Optional[str]
    cap: Optional[torch.Tensor]


@dataclass
class Prepared:
    """The float model DFQ's transform produced and what it did."""

    model: nn.Module
    folded: List[Tuple[str, str]] = field(default_factory=list)
    equalized: List[dict] = field(default_factory=list)
    skipped: List[dict] = field(default_factory=list)
    absorbed: List[dict] = field(default_factory=list)
    passes: int = 0
    relu6: str = "clip"
    input_stats: Dict[str, InputStats] = field(default_factory=dict)

    def report(self) -> dict:
        if not self.folded and not self.equalized:
            return {}
        return {"dfq": {"folded_bn": len(self.folded), "equalized_pairs": self.equalized,
                        "skipped_pairs": self.skipped, "cle_passes": self.passes,
                        "high_bias_absorbed": self.absorbed, "relu6": self.relu6}}


# ---- finding the chains ---------------------------------------------------------------------------
def _module(model: nn.Module, node: G.FlowNode) -> Optional[nn.Module]:
    return model.get_submodule(node.target) if node.kind == "module" else None


def _act_kind(model: nn.Module, node: G.FlowNode) -> Optional[str]:
    """'relu', 'relu6', 'clip' (ChannelClippedReLU) for activations CLE can pass, 'other' for any other
    clipping activation, None when the node is no activation."""
    mod = _module(model, node)
    if mod is not None:
        if isinstance(mod, ChannelClippedReLU):
            return "clip"
        if type(mod) is nn.ReLU:
            return "relu"
        if type(mod) is nn.ReLU6:
            return "relu6"
        return "other" if isinstance(mod, G.ACT_MODULES) else None
    if node.kind == "call_function" and node.target in (F.relu, torch.relu) or \
            node.kind == "call_method" and node.target == "relu":
        return "relu"
    if node.kind in ("call_function", "call_method") and (node.target in G.ACT_FUNCTIONS or node.target in G.ACT_METHODS):
        return "other"
    return None


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1


def _calls(nodes: List[G.FlowNode]) -> Dict[str, int]:
    count: Dict[str, int] = {}
    for n in nodes:
        if n.kind == "module":
            count[n.target] = count.get(n.target, 0) + 1
    return count


def find_pairs(model: nn.Module, nodes: List[G.FlowNode]) -> Tuple[List[Pair], List[dict]]:
    """The conv pairs CLE may scale, in call order, and the chains it may not (with why)."""
    calls = _calls(nodes)
    pairs, skipped = [], []
    for i, node in enumerate(nodes):
        conv1 = _module(model, node)
        if not isinstance(conv1, nn.Conv2d) or isinstance(conv1, QUANT_LAYER_TYPES):
            continue
        cur, bn, act, padded = i, None, None, False
        while len(nodes[cur].users) == 1:
            nxt = nodes[cur].users[0]
            mod, kind = _module(model, nodes[nxt]), _act_kind(model, nodes[nxt])
            if isinstance(mod, FoldedBatchNorm) and bn is None and act is None:
                bn = nodes[nxt].target
            elif kind is not None and act is None:
                act = nodes[nxt].target if nodes[nxt].kind == "module" else f"function:{getattr(nodes[nxt].target, '__name__', nodes[nxt].target)}"
                if kind == "other":
                    skipped.append({"conv1": node.target, "why": f"activation {act} is not ReLU/ReLU6"})
                    break
            elif _pass_kind(mod) is not None:
                padded = padded or _pass_kind(mod) == "pad"
            elif isinstance(mod, nn.Conv2d) and not isinstance(mod, QUANT_LAYER_TYPES):
                # a stateless ReLU may be shared between call sites (torchvision's BasicBlock); a ReLU6
                # becomes a per-channel clip of this pair's channels, so it may not
                clip = act if act is not None and not act.startswith("function:") and \
                    not type(model.get_submodule(act)) is nn.ReLU else None
                why = None
                if mod.groups != 1 and not _is_depthwise(mod):
                    why = f"{nodes[nxt].target} is a grouped conv (only plain and depthwise are equalized)"
                elif conv1.groups != 1 and not _is_depthwise(conv1):
                    why = f"{node.target} is a grouped conv (only plain and depthwise are equalized)"
                elif any(calls.get(m, 0) != 1 for m in (node.target, nodes[nxt].target, bn, clip) if m is not None):
                    why = "a module CLE changes (conv, BN, ReLU6) is called more than once"
                if why is None:
                    pairs.append(Pair(node.target, nodes[nxt].target, bn, act, padded))
                else:
                    skipped.append({"conv1": node.target, "conv2": nodes[nxt].target, "why": why})
                break
            else:
                break
            cur = nxt
    return pairs, skipped


def input_stats(model: nn.Module, nodes: List[G.FlowNode]) -> Dict[str, InputStats]:
    """For each Conv2d/Linear whose input is (activation of) a folded BN's output: that BN and activation."""
    out: Dict[str, InputStats] = {}
    for node in nodes:
        layer = _module(model, node)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or not node.inputs:
            continue
        cur, act, cap = node.inputs[0], None, None
        while True:
            src = nodes[cur]
            mod, kind = _module(model, src), _act_kind(model, src)
            if isinstance(mod, FoldedBatchNorm):
                out[node.target] = InputStats(src.target, act, cap)
                break
            if kind in ("relu", "relu6", "clip") and act is None:
                act = str(src.target)
                cap = {"relu": lambda: torch.tensor([math.inf]), "relu6": lambda: torch.tensor([6.0]),
                       "clip": lambda: mod.cap.detach().clone()}[kind]()
            elif _pass_kind(mod) is not None:
                pass
            else:
                break
            if not src.inputs:
                break
            cur = src.inputs[0]
    return out


# ---- the transform ----------------------------------------------------------------------------------
def _out_range(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().reshape(conv.weight.shape[0], -1).amax(1)


def _in_range(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach().abs()
    if _is_depthwise(conv):
        return w.reshape(w.shape[0], -1).amax(1)
    return w.transpose(0, 1).reshape(w.shape[1], -1).amax(1)


@torch.no_grad()
def _scale_pair(model: nn.Module, p: Pair) -> torch.Tensor:
    """Equalize one pair in place; returns the scale s (conv1's output channel c divided by s_c)."""
    c1, c2 = model.get_submodule(p.conv1), model.get_submodule(p.conv2)
    r1, r2 = _out_range(c1).double(), _in_range(c2).double()
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-300)), torch.ones_like(r1)).float()
    view = (-1,) + (1,) * (c1.weight.dim() - 1)
    c1.weight.div_(s.reshape(view))
    if c1.bias is not None:
        c1.bias.div_(s)
    if _is_depthwise(c2):
        c2.weight.mul_(s.reshape(view))
    else:
        c2.weight.mul_(s.reshape(1, -1, *([1] * (c2.weight.dim() - 2))))
    if p.bn is not None:
        bn = model.get_submodule(p.bn)
        bn.weight.div_(s)
        bn.bias.div_(s)
    if p.act is not None and not p.act.startswith("function:"):
        act = model.get_submodule(p.act)
        if isinstance(act, ChannelClippedReLU):
            act.cap.div_(s)
    return s


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _handle_relu6(model: nn.Module, pairs: List[Pair], mode: str, skipped: List[dict]) -> List[Pair]:
    """ReLU6 between a pair: 'clip' makes it a per-channel clip (exact), 'relu' a ReLU (the paper's; the
    float function changes where pre-activations exceed 6), 'skip' leaves the pair alone."""
    kept = []
    for p in pairs:
        act = model.get_submodule(p.act) if p.act is not None and not p.act.startswith("function:") else None
        if type(act) is nn.ReLU6:
            if mode == "skip":
                skipped.append({"conv1": p.conv1, "conv2": p.conv2, "why": "ReLU6 between them (relu6=skip)"})
                continue
            c = model.get_submodule(p.conv1).weight.shape[0]
            _set_module(model, p.act, ChannelClippedReLU(torch.full((c,), 6.0)) if mode == "clip" else nn.ReLU())
        kept.append(p)
    return kept


@torch.no_grad()
def _absorb(model: nn.Module, p: Pair, mode: str) -> Optional[dict]:
    """High-bias absorption for one pair; returns what moved (None when nothing could)."""
    c1, c2 = model.get_submodule(p.conv1), model.get_submodule(p.conv2)
    if mode == "none" or p.bn is None or c1.bias is None:
        return None
    padded = p.padded or isinstance(c2.padding, str) or any(int(x) != 0 for x in c2.padding)
    if mode == "unpadded" and padded:
        return None  # padded zeros do not carry +c: inexact at the borders
    bn = model.get_submodule(p.bn)
    act = model.get_submodule(p.act) if p.act is not None and not p.act.startswith("function:") else None
    gamma, beta = bn.weight, bn.bias
    if p.act is None:
        c = beta.clone()
    else:
        c = torch.clamp(beta - 3.0 * gamma.abs(), min=0.0)
        if isinstance(act, ChannelClippedReLU):
            c = torch.minimum(c, act.cap)
    if not bool((c != 0).any()):
        return None
    if c2.bias is None:
        c2.bias = nn.Parameter(torch.zeros(c2.out_channels, device=c2.weight.device))
    w2 = c2.weight.reshape(c2.weight.shape[0], c2.weight.shape[1], -1).sum(2)
    c2.bias.add_(w2[:, 0] * c if _is_depthwise(c2) else w2 @ c)
    c1.bias.sub_(c)
    bn.bias.sub_(c)
    if isinstance(act, ChannelClippedReLU):
        act.cap.sub_(c)
    return {"conv1": p.conv1, "conv2": p.conv2, "channels": int((c > 0).sum()), "max": float(c.abs().max())}


def prepare_data_free(fp_model: nn.Module, *, fold: bool = True, equalize: bool = True, iterations: int = 100,
                      relu6: str = "clip", absorb: str = "unpadded", tol: float = 1e-6) -> Prepared:
    """A copy of ``fp_model`` with BN folded (``fold``) and, with ``equalize``, CLE iterated over all pairs
    until no scale moves by more than ``tol`` (at most ``iterations`` passes; 1 = AIMET's single pass),
    then HBA (``absorb``). ``fp_model`` is not changed. Without fold nor equalize: the model itself."""
    if relu6 not in RELU6_MODES or absorb not in ABSORB_MODES:
        raise ZsqError(f"relu6 must be one of {RELU6_MODES} and absorb one of {ABSORB_MODES}")
    if not fold and not equalize:
        return Prepared(fp_model)
    from zsq.quant.transforms import fold_batchnorm
    from zsq.quant.inventory import example_input_for

    model = copy.deepcopy(fp_model).eval()
    example = example_input_for(model)
    if example is None:
        raise ZsqError("DFQ's transform needs the model's input size (load it with zsq.models.load or attach "
                       "metadata with zsq.models.set_meta)")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ZsqError("DFQ (equalize / bias_correct) needs BatchNorm layers after the convs: this model has "
                       "none, so there are no statistics for absorption, bias correction or activation ranges")
    prep = Prepared(model, folded=fold_batchnorm(model, example), relu6=relu6)
    if not prep.folded:
        raise ZsqError("DFQ (equalize / bias_correct) found no BatchNorm reading a conv's output to fold")
    nodes = G.flow_graph(model, keep=(FoldedBatchNorm, ChannelClippedReLU))
    if equalize:
        pairs, prep.skipped = find_pairs(model, nodes)
        pairs = _handle_relu6(model, pairs, relu6, prep.skipped)
        total = {i: torch.ones(model.get_submodule(p.conv1).weight.shape[0]) for i, p in enumerate(pairs)}
        for prep.passes in range(1, iterations + 1):
            moved = 0.0
            for i, p in enumerate(pairs):
                s = _scale_pair(model, p)
                total[i] *= s
                moved = max(moved, float((s - 1).abs().max()))
            if moved < tol:
                break
        for i, p in enumerate(pairs):
            c1, c2 = model.get_submodule(p.conv1), model.get_submodule(p.conv2)
            prep.equalized.append({"conv1": p.conv1, "conv2": p.conv2, "act": p.act,
                                   "kind": "depthwise" if _is_depthwise(c1) or _is_depthwise(c2) else "conv",
                                   "scale_min": float(total[i].min()), "scale_max": float(total[i].max())})
            got = _absorb(model, p, absorb)
            if got is not None:
                prep.absorbed.append(got)
        logger.info(f"DFQ: folded {len(prep.folded)} BN, equalized {len(pairs)} conv pairs in {prep.passes} "
                    f"pass(es), absorbed high biases in {len(prep.absorbed)}; skipped {len(prep.skipped)}")
        nodes = G.flow_graph(model, keep=(FoldedBatchNorm, ChannelClippedReLU))
    prep.input_stats = input_stats(model, nodes)
    return prep


# ---- analytic bias correction --------------------------------------------------------------------
def clipped_normal_mean(beta: torch.Tensor, gamma: torch.Tensor, cap: Optional[torch.Tensor]) -> torch.Tensor:
    """E[min(max(z, 0), cap)] for z ~ N(beta, gamma^2) per channel (cap None: E[z] = beta; cap inf: ReLU)."""
    beta, gamma = beta.double(), gamma.double().abs()
    if cap is None:
        return beta
    cap = cap.double().expand_as(beta)
    normal = torch.distributions.Normal(0.0, 1.0)
    g = gamma.clamp(min=1e-12)
    a, b = -beta / g, (cap - beta) / g
    pdf = lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    fin = torch.isfinite(b)
    bb = torch.where(fin, b, torch.zeros_like(b))
    mean = g * (pdf(a) - torch.where(fin, pdf(bb), torch.zeros_like(b))) \
        + beta * (torch.where(fin, normal.cdf(bb), torch.ones_like(b)) - normal.cdf(a)) \
        + torch.where(fin, cap * (1 - normal.cdf(bb)), torch.zeros_like(b))
    point = torch.minimum(torch.clamp(beta, min=0.0), cap)  # gamma == 0: no spread
    return torch.where(gamma > 0, mean, point)


@torch.no_grad()
def correct_bias(qmodel: nn.Module, prep: Prepared) -> dict:
    """b <- b - sum_kernel(W_hat - W) . E[x] on every quantized layer whose input a folded BN predicts
    (E[x] from the prepared float model's BN and activation). Layers whose input comes from a residual
    add, a pooling or the image are left as they are (listed). Returns the report entry."""
    corrected, skipped = [], []
    for name, layer in ((n, m) for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYER_TYPES)):
        st = prep.input_stats.get(name)
        if st is None or layer.weight_quant is None:
            skipped.append(name)
            continue
        bn = prep.model.get_submodule(st.bn)
        mean = clipped_normal_mean(bn.bias, bn.weight, st.cap).float()
        w = layer.weight
        eps = (layer.quantized_weight() - w).reshape(w.shape[0], w.shape[1], -1).sum(2)  # [Cout, Cin/groups]
        groups = getattr(layer, "groups", 1)
        if mean.numel() != eps.shape[1] * groups:
            skipped.append(name)
            continue
        cout_g = eps.shape[0] // groups
        delta = torch.bmm(eps.reshape(groups, cout_g, -1), mean.reshape(groups, -1, 1)).reshape(-1)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device))
        layer.bias.sub_(delta.to(layer.bias.dtype))
        corrected.append({"layer": name, "max_shift": float(delta.abs().max())})
    logger.info(f"bias correction: {len(corrected)} layers corrected, {len(skipped)} without BN-predicted input")
    return {"corrected": corrected, "skipped": skipped}


# ---- checkpoints: the structure DFQ's transform leaves, so a saved model can be rebuilt ------------
def structure_of(prep: Prepared) -> dict:
    """What ``rebuild_structure`` needs to give a freshly loaded float model the same modules and
    parameter names (the values come from the checkpoint): BN folded, which ReLU6 became per-channel clips."""
    clips = {n: int(m.cap.numel()) for n, m in prep.model.named_modules() if isinstance(m, ChannelClippedReLU)}
    return {"fold_bn": bool(prep.folded), "channel_clips": clips}


def rebuild_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Apply a recorded DFQ structure to ``model`` (in place): fold BN, ReLU6 -> ChannelClippedReLU."""
    from zsq.quant.transforms import fold_batchnorm
    from zsq.quant.inventory import example_input_for

    if structure.get("fold_bn"):
        example = example_input_for(model)
        if example is None:
            raise ZsqError("rebuilding a DFQ-transformed model needs its input size (zsq metadata)")
        fold_batchnorm(model, example)
    for name, channels in structure.get("channel_clips", {}).items():
        _set_module(model, name, ChannelClippedReLU(torch.full((int(channels),), 6.0)))
    return model


def add_missing_biases(qmodel: nn.Module, names) -> None:
    """Zero biases on the named layers that have none (absorption and bias correction gave them one)."""
    for name in names:
        layer = qmodel.get_submodule(name)
        if getattr(layer, "bias", None) is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device))
