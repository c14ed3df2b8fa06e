"""Training configs of the distillation loop, with the papers' (`paper`) and a CPU (`quick`) budget.

Every published number these configs reproduce comes from the official GDFQ/AIT configs (hocon) and HAST's
main_direct.py configs. ``quick`` keeps each method's recipe (losses, lr, rho, schedule shape) and shrinks epochs,
iterations and batch so that one run fits a shared 2-core CPU in minutes; the milestones shrink in
proportion. The CLI's --epochs/--iters-per-epoch/--batch-size and ``job.extra`` override fields.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional, Tuple

from zsq.budget_names import check_budget
from zsq.errors import ZsqError
from zsq.qat.inundation import GIConfig

SDP_OBJECTIVES = ("kd_fa", "difficulty")
TRAIN_ON = ("clean+adv", "adv")
SOURCES = ("generator", "fixed")
CAM_CLASSES = ("argmax", "label")


@dataclass(frozen=True)
class HASTTrainConfig:
    """HAST's fine-tuning step (official trainer_direct.py `Trainer.train`). Official code: lambda 1000 and eps 0.01 (hard-coded),
    the perturbation ascends KD+FA through both models, and the loss is on clean + perturbed samples.
    The paper: the perturbation ascends the quantized model's difficulty 1 - p_y, loss on perturbed only."""

    feature_weight: float = 1000.0
    eps: float = 0.01
    sdp_objective: str = "kd_fa"
    train_on: str = "clean+adv"
    augment: bool = True  # RandomResizedCrop(0.5-1) + flip on every draw (HAST's official code)

    def __post_init__(self):
        if self.sdp_objective not in SDP_OBJECTIVES:
            raise ZsqError(f"HAST sdp_objective must be one of {SDP_OBJECTIVES}, got {self.sdp_objective!r}")
        if self.train_on not in TRAIN_ON:
            raise ZsqError(f"HAST train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if self.feature_weight < 0 or self.eps < 0:
            raise ZsqError(f"HAST needs feature_weight >= 0 and eps >= 0, got {self.feature_weight}, {self.eps}")


@dataclass(frozen=True)
class SynQConfig:
    """SynQ's three fine-tuning parts (ICLR 2025; spec ../shared/specs/synq.md, code in zsq/qat/synq.py).

    lowpass/d0: Gaussian low-pass filter exp(-D^2/(2 d0^2)) on the centred spectrum of every training batch.
    ce_weight/tau: lambda_CE * CE on the synthetic labels, kept only for samples whose teacher difficulty
    1 - p_y is < tau (the others count as a constant, as in the official code); 0 turns it off.
    cam_weight/cam_class/cam_layer: lambda_CAM * MSE between the teacher's and the student's Grad-CAM maps
    at cam_layer ("" = the last Conv2d whose output is larger than 1x1), for each model's own argmax class
    (the official code) or the synthetic label (the paper's Eq. 5); 0 turns it off.
    perturbed_fa: keep HAST's feature alignment on the perturbed copy (SynQ drops it on CIFAR)."""

    lowpass: bool = True
    d0: float = 80.0
    ce_weight: float = 5.0
    tau: float = 0.5
    cam_weight: float = 200.0
    cam_class: str = "argmax"
    cam_layer: str = ""
    perturbed_fa: bool = True

    def __post_init__(self):
        from zsq.options import check_range

        check_range("synq d0", self.d0, 0.0, 1e6, lo_open=True)
        check_range("synq tau", self.tau, 0.0, 1.0)
        check_range("synq ce_weight", self.ce_weight, 0.0, 1e6)
        check_range("synq cam_weight", self.cam_weight, 0.0, 1e6)
        if self.cam_class not in CAM_CLASSES:
            raise ZsqError(f"synq cam_class must be one of {CAM_CLASSES}, got {self.cam_class!r}")


def synq_config(meta) -> SynQConfig:
    """SynQ's defaults for a teacher. D0 = 80 (the code default). CIFAR: the argparse defaults lambda_CE 5,
    lambda_CAM 200 (no CIFAR config ships), tau 0.7 on 10 classes (the paper's best for CIFAR-10, App. C.11)
    else 0.5, no FA on the perturbed copy; ImageNet: the shipped R18 config, lambda_CE 0.5, lambda_CAM 50, tau 0.5."""
    if meta.small_input:
        return SynQConfig(ce_weight=5.0, cam_weight=200.0, tau=0.7 if meta.num_classes == 10 else 0.5,
                          perturbed_fa=False)
    return SynQConfig(ce_weight=0.5, cam_weight=50.0, tau=0.5, perturbed_fa=True)


@dataclass(frozen=True)
class QATConfig:
    """One distillation run. Epochs count from 0; epochs < warmup_epochs only train the generator and
    calibrate activation ranges (the student is not stepped); ranges are live (EMA) in epochs <
    live_range_epochs and frozen after. lr (and rho, and the generator lr) drop x lr_decay at each
    milestone epoch (epoch >= milestone)."""

    method: str = "gdfq"
    epochs: int = 400
    iters_per_epoch: int = 200
    batch_size: int = 200
    warmup_epochs: int = 4
    live_range_epochs: int = 4
    lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    milestones: Tuple[int, ...] = (100, 200, 300)
    lr_decay: float = 0.1
    optimizer: str = "sgd"
    temperature: float = 20.0
    kd_scale: float = 400.0
    kl_reduction: str = "mean"
    ce_scale: float = 1.0
    data: str = "generator"
    calib_data: str = "generator"
    gen_lr: float = 1e-3
    gen_betas: Tuple[float, float] = (0.5, 0.999)
    bns_weight: float = 0.1
    latent_dim: int = 100
    gi: Optional[GIConfig] = None
    hast: Optional[HASTTrainConfig] = None
    synq: Optional[SynQConfig] = None
    eval_every: int = 1
    ema_bias_correction: Optional[bool] = None  # None keeps the preset's (gdfq: True, the official quirk)
    # Warm start (a departure from the papers, which start from a min/max-calibrated student): "none", or a
    # reconstruction method (genie, brecq, qdrop, adaround) run first on the training images on the preset's
    # fixed-grid form (zsq.quant.qconfig.fixed_grids), whose student the loop then fine-tunes with no calibration
    # epochs. warm_iters: that reconstruction's steps per unit (None: its budget's).
    warm_start: str = "none"
    warm_iters: Optional[int] = None

    def __post_init__(self):
        for name in ("epochs", "iters_per_epoch", "eval_every", "latent_dim"):
            if int(getattr(self, name)) < 1:
                raise ZsqError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ZsqError(f"batch_size must be >= 2, got {self.batch_size}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ZsqError(f"warmup_epochs must be in [0, epochs) = [0, {self.epochs}), got {self.warmup_epochs}")
        if self.live_range_epochs < 0:
            raise ZsqError(f"live_range_epochs must be >= 0, got {self.live_range_epochs}")
        if self.lr <= 0 or self.gen_lr <= 0:
            raise ZsqError(f"learning rates must be > 0, got lr={self.lr}, gen_lr={self.gen_lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ZsqError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.kl_reduction not in ("mean", "batchmean"):
            raise ZsqError(f"kl_reduction must be 'mean' or 'batchmean', got {self.kl_reduction!r}")
        for name in ("data", "calib_data"):
            if getattr(self, name) not in SOURCES:
                raise ZsqError(f"{name} must be one of {SOURCES}, got {getattr(self, name)!r}")
        if self.warm_start != "none":
            from zsq.methods.registry import get_method

            if get_method(self.warm_start).kind != "ptq":  # an unknown name is refused with the list by get_method
                raise ZsqError(f"warm_start must be 'none' or a reconstruction method (genie, brecq, qdrop, adaround), "
                               f"got {self.warm_start!r}")
        if self.warm_iters is not None and not 1 <= self.warm_iters <= 100000:
            raise ZsqError(f"warm_iters must be from 1 to 100000, got {self.warm_iters}")
        if self.ce_scale < 0 or self.kd_scale < 0 or self.temperature <= 0:
            raise ZsqError("need ce_scale >= 0, kd_scale >= 0, temperature > 0")
        if self.synq is not None and self.hast is not None and self.hast.sdp_objective != "kd_fa":
            raise ZsqError("synq adds to gdfq, ait and hast (the official HAST step), not to hast-paper's "
                           "difficulty perturbation")
        object.__setattr__(self, "milestones", tuple(sorted(int(m) for m in self.milestones)))
        object.__setattr__(self, "gen_betas", tuple(float(b) for b in self.gen_betas))

    def lr_at(self, epoch: int) -> float:
        return self.lr * self.lr_decay ** sum(1 for m in self.milestones if epoch >= m)

    @property
    def uses_generator(self) -> bool:
        return self.data == "generator" or (self.calib_data == "generator" and self.warmup_epochs > 0)

    @property
    def uses_fixed(self) -> bool:
        return self.data == "fixed" or (self.calib_data == "fixed" and self.warmup_epochs > 0)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_options(self, **options) -> "QATConfig":
        """Override fields by name (the CLI's --epochs etc. and job.extra); GI/HAST fields may be given
        with a ``gi_`` / ``hast_`` prefix (e.g. gi_rho=1e-4, hast_eps=0.02). Unknown names are refused."""
        from zsq.options import parse_options

        top = {f.name for f in fields(self)} - {"gi", "hast", "synq", "method"}
        own, gi, hast, synq, bad = {}, {}, {}, {}, []
        for k, v in options.items():
            if v is None:
                continue
            if k.startswith("gi_") and self.gi is not None and k[3:] in {f.name for f in fields(GIConfig)}:
                gi[k[3:]] = v
            elif k.startswith("hast_") and self.hast is not None and k[5:] in {f.name for f in fields(HASTTrainConfig)}:
                hast[k[5:]] = v
            elif k.startswith("synq_") and self.synq is not None and k[5:] in {f.name for f in fields(SynQConfig)}:
                synq[k[5:]] = v
            elif k in top:
                own[k] = v
            else:
                bad.append(k)
        if bad:
            valid = sorted(top) + [f"gi_{f.name}" for f in fields(GIConfig) if self.gi is not None] + [
                f"hast_{f.name}" for f in fields(HASTTrainConfig) if self.hast is not None] + [
                f"synq_{f.name}" for f in fields(SynQConfig) if self.synq is not None]
            if any(k.startswith("synq_") for k in bad) and self.synq is None:
                valid.append("synq (true turns SynQ on; then synq_ options)")
            raise ZsqError(f"{self.method} has no option {', '.join(sorted(bad))}; its options are: {', '.join(valid)}")
        cfg = parse_options(QATConfig, own, self.method, base=self)
        if gi:
            cfg = replace(cfg, gi=parse_options(GIConfig, gi, f"{self.method} (gi_ options)", base=cfg.gi))
        if hast:
            cfg = replace(cfg, hast=parse_options(HASTTrainConfig, hast, f"{self.method} (hast_ options)",
                                                  base=cfg.hast))
        if synq:
            cfg = replace(cfg, synq=parse_options(SynQConfig, synq, f"{self.method} (synq_ options)", base=cfg.synq))
        return cfg

    def with_synq(self, on, meta) -> "QATConfig":
        """SynQ's parts switched on (with the teacher's defaults, ``synq_config``) or off: ``--set synq=true``."""
        from zsq.options import coerce

        try:
            on = coerce(bool, on, "synq")
        except ValueError as e:
            raise ZsqError(f"{self.method}: {e}") from None
        if self.method == "synq" and not on:
            raise ZsqError("synq=false on method synq: use method hast for the same loop without SynQ's parts")
        if not on:
            return replace(self, synq=None)
        return self if self.synq is not None else replace(self, synq=synq_config(meta))

    def rescaled(self, epochs: int, iters_per_epoch: int, batch_size: int, warmup_epochs: int,
                 live_range_epochs: int) -> "QATConfig":
        """The same recipe on a smaller budget: lr/rho milestones moved in proportion to the epochs."""
        def scale(ms):
            return tuple(max(warmup_epochs + 1, round(m * epochs / self.epochs)) for m in ms)

        cfg = replace(self, epochs=epochs, iters_per_epoch=iters_per_epoch, batch_size=batch_size,
                      warmup_epochs=warmup_epochs, live_range_epochs=live_range_epochs,
                      milestones=scale(self.milestones))
        if cfg.gi is not None:
            cfg = replace(cfg, gi=replace(cfg.gi, rho_milestones=scale(self.gi.rho_milestones)))
        return cfg


def paper_config(method: str, meta) -> QATConfig:
    """The published recipe for a method on this teacher (CIFAR-size vs ImageNet-size inputs)."""
    small = meta.small_input
    if method == "gdfq":  # the official GDFQ config
        return QATConfig(method="gdfq", batch_size=200 if small else 16, warmup_epochs=4 if small else 50,
                         lr=1e-4 if small else 1e-6, weight_decay=1e-4, ce_scale=1.0)
    if method == "ait":  # the official AIT config: KL only, wd 0, GI rho 1e-3 (CIFAR) / 1e-4 (ImageNet)
        return QATConfig(method="ait", batch_size=200 if small else 16, warmup_epochs=4 if small else 50,
                         lr=1e-4, weight_decay=0.0, ce_scale=0.0,
                         gi=GIConfig(rho=1e-3 if small else 1e-4, rho_milestones=(100, 200, 300)))
    if method in ("hast", "hast-paper"):  # the official HAST config (one process = the 4-GPU global batch)
        hast = HASTTrainConfig() if method == "hast" else HASTTrainConfig(sdp_objective="difficulty", train_on="adv")
        return QATConfig(method=method, epochs=151, iters_per_epoch=200, batch_size=256 if small else 16,
                         warmup_epochs=4, live_range_epochs=4, lr=1e-5 if small else 1e-6, weight_decay=1e-4,
                         milestones=(20, 40, 60) if small else (100, 200, 350), kd_scale=8000.0,
                         kl_reduction="batchmean", ce_scale=0.0, data="fixed", calib_data="generator", hast=hast)
    if method == "synq":  # a fork of HAST's code: its step, plus SynQ's parts; 101 epochs (0-3 calibration)
        return replace(paper_config("hast", meta), method="synq", epochs=101, synq=synq_config(meta))
    raise ZsqError(f"no QAT recipe for method {method!r}; choose gdfq, ait, hast, hast-paper or synq")


# quick budget, measured on the shared 2-core CPU (benchmarks/results/qat.md): about 5-10 minutes
# per CIFAR ResNet-20 run; ImageNet-size teachers get a smoke-test budget.
# The quick budget turns off GDFQ's EMA "bias correction" quirk: it inflates activation ranges ~1000x
# for the first ~150 updates (the official GDFQ/AIT quantization_utils), longer than a quick calibration runs, which leaves the
# student at chance accuracy; a plain EMA settles in a few dozen steps.
QUICK_CIFAR = dict(epochs=5, iters_per_epoch=40, batch_size=32, warmup_epochs=1, live_range_epochs=1)
QUICK_IMAGENET = dict(epochs=3, iters_per_epoch=10, batch_size=8, warmup_epochs=1, live_range_epochs=1)


# standard budget (zsq.budget_names), 32-pixel teachers: a warm start (Genie-M at its quick budget on the training
# images, on the preset's fixed-grid form), then the method's own recipe for STANDARD_CIFAR's steps with the
# milestones in proportion. Chosen from benchmarks/results/qat_warm_start.md: on ResNet-20 the warm start
# alone gives 91.45 % (W4A4) and 88.10 % (W3A3) on exact-1017, where the quick budget's cold starts end at
# 84.7-87.9 % and 46-55 %.
STANDARD_CIFAR = dict(epochs=5, iters_per_epoch=40, batch_size=32, warmup_epochs=1, live_range_epochs=1)
STANDARD_WARM_START = "genie"


def method_config(method: str, meta, budget: str = "quick") -> QATConfig:
    """`paper`, `standard` or `quick` config for method on the teacher described by meta."""
    cfg = paper_config(method, meta)
    if check_budget(budget) == "paper":
        return cfg
    if budget == "standard":
        if not meta.small_input:
            raise ZsqError("the QAT standard budget is defined for 32-pixel teachers so far (no curve has chosen "
                           "it on 224-pixel ones); use --budget quick or paper")
        return replace(cfg.rescaled(**STANDARD_CIFAR), ema_bias_correction=False, warm_start=STANDARD_WARM_START)
    cfg = cfg.rescaled(**(QUICK_CIFAR if meta.small_input else QUICK_IMAGENET))
    return replace(cfg, ema_bias_correction=False)
