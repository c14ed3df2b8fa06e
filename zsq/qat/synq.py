"""SynQ's fine-tuning parts (Kim, Kim, Kang, ICLR 2025; spec ../shared/specs/synq.md), plugged into the one loop.

    I1  x <- lowpass(x): Gaussian H(u,v) = exp(-D^2 / (2 d0^2)) on the centred 2-D spectrum, per image and channel
    I2  lambda_CAM * mean (S_T(x) - S_Q(x))^2, S = min-max normalised Grad-CAM at the last spatial conv
    I3  lambda_CE * CE(Q(x), y) kept for the easy samples only: 1 - softmax(T(x))_y < tau

SynQ's official code is a fork of HAST's, so on ``hast`` (and the ``synq`` method) the masked CE joins HAST's
KD + FA objective on the clean batch (and so its FGSM input gradient) and on the perturbed copy with the clean
batch's mask, and the CAM term is added once, on the clean batch (``difficulty_promotion.hast_step`` calls
``SynQParts.clean_terms`` / ``adv_terms``). On gdfq/ait (``plain_step``) SynQ "replaces X's fine-tuning objective
with Eq. 6" (the paper, App. C.6): X's KD + the masked CE (instead of X's plain CE) + the CAM term.

The Grad-CAM channel weights are constants (no second-order graph), clamped >= 1e-10 as the official code does,
so the CAM loss reaches the student through its activations only; the teacher's map is a constant target.
The maps are read from the clean forward passes the step already makes (forward hooks on the CAM layer), so
the CAM costs two partial backward passes (score -> CAM layer), not two more forward passes.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.errors import ZsqError
from zsq.hooks import Hooks
from zsq.qat.training_config import SynQConfig

logger = logging.getLogger(__name__)

_CAM_EPS = 1e-10  # the official code's clamp of the channel weights and the min-max denominator


def gaussian_lowpass_kernel(height: int, width: int, d0: float, device=None) -> torch.Tensor:
    """H(v, u) = exp(-((v - floor(H/2))^2 + (u - floor(W/2))^2) / (2 d0^2)): 1 at the DC bin of an fftshift'ed
    spectrum (index (H//2, W//2) for odd and even sizes alike), falling with the distance from it."""
    v = torch.arange(height, device=device, dtype=torch.float32) - height // 2
    u = torch.arange(width, device=device, dtype=torch.float32) - width // 2
    d2 = v[:, None] ** 2 + u[None, :] ** 2
    return torch.exp(-d2 / (2.0 * float(d0) ** 2))


def lowpass(x: torch.Tensor, d0: float) -> torch.Tensor:
    """SynQ's filter (Eq. 4) on every image and channel of ``x`` (N, C, H, W): Re(IFFT2(ifftshift(H * fftshift(FFT2 x)))).

    Computed in float32 whatever ``x`` is; returns x's dtype and shape; NaNs become 0 (as the official code)."""
    if x.dim() != 4:
        raise ZsqError(f"the low-pass filter needs (N, C, H, W) images, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    spec = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    spec = spec * gaussian_lowpass_kernel(h, w, d0, x.device)
    out = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real
    return torch.nan_to_num(out, nan=0.0).to(x.dtype)


def easy_mask(teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """True for the samples SynQ keeps the hard-label CE on: teacher difficulty 1 - softmax(t)_y < tau (strict,
    as the official code; the paper's Eq. 6 writes <=)."""
    p_y = F.softmax(teacher_logits.detach().float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return (1.0 - p_y) < tau


def masked_ce(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE averaged over the whole batch with the hard samples' logits set to 0 and labels to 0 (the official
    code): each hard sample adds the constant ln C with no gradient, so the weight is (#easy / B) * mean_easy CE."""
    logits = torch.where(mask[:, None], student_logits, torch.zeros_like(student_logits))
    return F.cross_entropy(logits, torch.where(mask, labels, torch.zeros_like(labels)))


def grad_cam(logits: torch.Tensor, acts: torch.Tensor, classes: torch.Tensor, size) -> torch.Tensor:
    """Min-max normalised Grad-CAM maps (B, 1, *size) of ``classes`` from the layer output ``acts`` that ``logits``
    were computed from. Channel weights w_k = mean_hw d score / d A_k, clamped >= 1e-10 and detached; the map
    keeps its graph to ``acts`` (the loss reaches the model through its activations)."""
    score = logits.gather(1, classes[:, None]).sum()  # samples are independent (eval-mode BN): one backward
    (g,) = torch.autograd.grad(score, acts, retain_graph=True)
    w = g.detach().float().mean(dim=(2, 3), keepdim=True).clamp_min(_CAM_EPS)
    cam = F.relu((w * acts.float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    lo = cam.amin(dim=(2, 3), keepdim=True)
    hi = cam.amax(dim=(2, 3), keepdim=True)
    return (cam - lo) / (hi - lo + _CAM_EPS)


def cam_target_layer(model: nn.Module, input_size) -> str:
    """The last ``nn.Conv2d`` in ``named_modules()`` order whose output is larger than 1x1 (one no-grad forward
    of a zero image). The official code takes the last Conv2d; on pytorchcv's MobileNetV2 that is the 1x1
    classifier conv, whose min-max normalised map is 0 everywhere (spec pitfall 1), hence the size rule."""
    sizes: Dict[str, int] = {}
    device = next(model.parameters()).device
    with Hooks() as hooks, torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                hooks.post(m, lambda _m, _i, out, name=name: sizes.__setitem__(name, out.shape[-1] * out.shape[-2]))
        model(torch.zeros(1, *tuple(input_size), device=device))
    order = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and sizes.get(n, 0) > 1]
    if not order:
        raise ZsqError(f"{type(model).__name__} has no Conv2d with a spatial output for SynQ's CAM "
                       "(set synq_cam_weight=0)")
    return order[-1]


class SynQParts:
    """SynQ's parts bound to one run: the filter, forward hooks on the CAM layer of teacher and student (the
    latest output of each), and the easy-sample mask of the current clean batch (reused on its perturbed copy)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: SynQConfig, input_size):
        self.cfg = cfg
        self.input_size = tuple(input_size)
        self._acts: Dict[str, torch.Tensor] = {}
        self._mask: Optional[torch.Tensor] = None
        self._hooks = Hooks()
        self.layer = None
        if cfg.cam_weight > 0:
            self.layer = cfg.cam_layer or cam_target_layer(teacher, self.input_size)
            try:
                for key, model in (("t", teacher), ("s", student)):
                    self._hooks.post(model.get_submodule(self.layer), self._recorder(key))
            except AttributeError:
                self._hooks.remove()
                convs = [n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d)]
                raise ZsqError(f"synq cam_layer {self.layer!r} is not a module of the model; its Conv2d layers "
                               f"are: {', '.join(convs[-5:])} (last five)") from None
            logger.info(f"synq: CAM alignment at {self.layer}")

    def _recorder(self, key: str):
        def hook(_m, _inp, out):
            self._acts[key] = out
        return hook

    def filter(self, x: torch.Tensor) -> torch.Tensor:
        """I1 on a training batch (after augmentation, as the official code)."""
        return lowpass(x, self.cfg.d0) if self.cfg.lowpass else x

    def _ce(self, s_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.cfg.ce_weight * masked_ce(s_logits, labels, self._mask)

    def cam_loss(self, t_logits: torch.Tensor, s_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """I2 from the layer outputs the latest teacher and student forwards left (they must be the clean ones)."""
        a_t, a_s = self._acts.pop("t", None), self._acts.pop("s", None)
        if a_t is None or a_s is None or not (a_t.requires_grad and a_s.requires_grad):
            raise ZsqError("internal: SynQ's CAM needs the clean teacher and student forwards with their graphs")
        own = self.cfg.cam_class == "argmax"
        cls_t = t_logits.detach().argmax(1) if own else labels
        cls_s = s_logits.detach().argmax(1) if own else labels
        cam_t = grad_cam(t_logits, a_t, cls_t, self.input_size[-2:]).detach()
        cam_s = grad_cam(s_logits, a_s, cls_s, self.input_size[-2:])
        return F.mse_loss(cam_s, cam_t)

    def clean_terms(self, t_logits: torch.Tensor, s_logits: torch.Tensor,
                    labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
        """On the clean batch, right after its teacher and student forwards: (masked CE, which joins the objective
        of HAST's perturbation; CAM term, added once; logged terms). Sets the mask ``adv_terms`` reuses."""
        zero = s_logits.new_zeros(())
        self._mask = easy_mask(t_logits, labels, self.cfg.tau)
        terms = {"synq_easy": float(self._mask.float().mean())}
        ce = self._ce(s_logits, labels) if self.cfg.ce_weight > 0 else zero
        cam = self.cfg.cam_weight * self.cam_loss(t_logits, s_logits, labels) if self.cfg.cam_weight > 0 else zero
        terms.update(synq_ce=float(ce.detach()), synq_cam=float(cam.detach()))
        return ce, cam, terms

    def adv_terms(self, s_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The masked CE on the perturbed copy, with the clean batch's mask."""
        if self.cfg.ce_weight <= 0:
            return s_logits.new_zeros(())
        if self._mask is None:
            raise ZsqError("internal: SynQ's perturbed CE before its clean batch")
        return self._ce(s_logits, labels)

    def plain_step(self, run_t: Callable, run_s: Callable, x: torch.Tensor, labels: torch.Tensor,
                   kd: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The student loss of a gdfq/ait step with SynQ: KD + masked CE + CAM on the (filtered) batch."""
        cam = self.cfg.cam_weight > 0
        # the teacher's Grad-CAM needs a graph from its CAM layer to its logits: with frozen weights only an
        # input that requires grad makes one
        x_t = x.detach().requires_grad_(True) if cam else x
        with torch.set_grad_enabled(cam):
            t_logits = run_t(x_t)
        s_logits = run_s(x)
        kd_v = kd(s_logits, t_logits.detach())
        ce, cam_v, terms = self.clean_terms(t_logits, s_logits, labels)
        loss = kd_v + ce + cam_v
        terms.update(kd=float(kd_v.detach()), loss=float(loss.detach()))
        return loss, terms

    def close(self) -> None:
        self._hooks.remove()
        self._acts = {}
        self._mask = None
