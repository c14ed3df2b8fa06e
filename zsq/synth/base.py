"""The Synthesizer interface, its registry, and the batch driver every method shares.

A method only says how to make *one batch* (`make_batch`) from a per-batch torch.Generator; the
driver here does the rest the same way for all of them: budgets, batch planning, per-batch
checkpoints in ``out/ckpt`` with bit-identical ``resume``, refusing a checkpoint made by a different
model/method/config, stopping on a non-finite loss, the final Genie-form BNS measurement and the
SyntheticSet with its metadata.

Repeatability: batch b draws everything (initial pixels/latents, labels, generator init, swing
shifts) from a generator seeded by derive_seed(seed, b), never from the global stream, so a resumed
run makes exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from zsq import distributed as zdist
from zsq import runstate
from zsq.compute import Compute, as_compute
from zsq.budget_names import check_budget
from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta, get_meta
from zsq.options import parse_options
from zsq.registry import Registry
from zsq.synth.bn_stats import batchnorm_layers, measure_genie_bns
from zsq.synth.dataset import SyntheticSet

CKPT_DIR = "ckpt"
MANIFEST = "manifest.json"
# Synthesis has two recipes: ``standard`` synthesizes with the quick one (its runs spend their extra time
# after synthesis: a warm start and longer training).
BUDGETS = ("quick", "paper")
RECIPE_OF_BUDGET = {"quick": "quick", "standard": "quick", "paper": "paper"}


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream (seed, *keys), independent of every other stream."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def batch_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, index))


class NonFiniteLoss(ZsqError):
    """A loss term became NaN or inf during synthesis."""


def check_finite(terms: Dict[str, torch.Tensor], where: str) -> Dict[str, float]:
    """Float values of `terms`; NonFiniteLoss naming the bad term(s) if any is NaN/inf."""
    values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}
    bad = [f"{k}={v}" for k, v in values.items() if not math.isfinite(v) and k != "total"]
    if not bad and not all(math.isfinite(v) for v in values.values()):
        bad = [f"total={values['total']}"]
    if bad:
        raise NonFiniteLoss(f"loss term {', '.join(bad)} at {where}")
    return values


@dataclass
class SynthConfig:
    """Fields every budget has; methods subclass it (validated in __post_init__)."""

    batch_size: int = 128
    iters: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ZsqError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.iters < 0:
            raise ZsqError(f"iters must be >= 0, got {self.iters}")

    @classmethod
    def paper(cls, meta: ModelMeta) -> "SynthConfig":
        return cls()

    @classmethod
    def quick(cls, meta: ModelMeta) -> "SynthConfig":
        return cls()


@dataclass
class BatchResult:
    images: torch.Tensor
    labels: Optional[torch.Tensor]
    losses: Dict[str, float]


@dataclass
class SynthContext:
    """What make_batch gets: the prepared teacher and everything fixed for the run."""

    teacher: nn.Module  # a private eval-mode copy with requires_grad off (methods may wrap it)
    meta: ModelMeta
    cfg: Any
    seed: int
    workdir: Optional[Path]
    show_progress: bool  # rank 0 only: one bar per run, not one per process
    state: Dict[str, Any] = dataclasses.field(default_factory=dict)
    compute: Compute = Compute()  # device/precision/layout: run the teacher via compute.forward(net, x)


class Synthesizer:
    """One synthesis method. Subclasses set `name`, `config_cls`, `summary` and implement make_batch."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    config_cls: ClassVar[type] = SynthConfig
    # Methods that match *batch* statistics need equal-size batches.
    needs_full_batches: ClassVar[bool] = True
    needs_bn: ClassVar[bool] = True

    # -- budgets -----------------------------------------------------------------------------
    def make_config(self, meta: ModelMeta, budget: str = "quick", **overrides) -> Any:
        base = getattr(self.config_cls, RECIPE_OF_BUDGET[check_budget(budget)])(meta)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return parse_options(self.config_cls, overrides, self.name, base=base)

    def plan(self, num_images: int, batch_size: int) -> List[int]:
        """Batch sizes for num_images; one smaller batch if num_images < batch_size."""
        if num_images < 1:
            raise ZsqError(f"num_images must be >= 1, got {num_images}")
        if num_images <= batch_size:
            return [num_images]
        full, rest = divmod(num_images, batch_size)
        if rest and self.needs_full_batches:
            lo, hi = full * batch_size, (full + 1) * batch_size
            divisors = [d for d in range(max(1, batch_size // 2), 2 * batch_size + 1) if num_images % d == 0]
            alt = f" or batch size {min(divisors, key=lambda d: abs(d - batch_size))}" if divisors else ""
            raise ZsqError(
                f"{self.name} synthesizes in equal batches of {batch_size} (BN statistics are batch statistics): "
                f"num_images={num_images} is not a multiple; use {lo} or {hi} images{alt}")
        return [batch_size] * full + ([rest] if rest else [])

    # -- hooks for subclasses ------------------------------------------------------------------
    def setup(self, ctx: SynthContext) -> None:
        """Once per run, before the batches (e.g. wrap the teacher, train a generator)."""

    def make_batch(self, ctx: SynthContext, index: int, size: int, gen: torch.Generator) -> BatchResult:
        raise NotImplementedError

    # -- the driver ----------------------------------------------------------------------------
    def run(self, teacher: nn.Module, num_images: int, *, seed: int = 0, budget: str = "quick",
            out=None, resume: bool = False, compute=None, **overrides) -> SyntheticSet:
        meta = get_meta(teacher)
        compute = as_compute(compute)
        lead = zdist.rank() == 0
        if self.needs_bn:
            batchnorm_layers(teacher)  # ZsqError explaining why synthesis needs BN
        cfg = self.make_config(meta, budget, **overrides)
        sizes = self.plan(num_images, cfg.batch_size)
        fingerprint = {
            "method": self.name, "model": meta.name, "weights": weights_digest(teacher),
            "config": dataclasses.asdict(cfg), "seed": int(seed), "num_images": int(num_images),
        }
        if not compute.is_reference:  # other arithmetic, other images: do not mix them in one set
            fingerprint["compute"] = {k: v for k, v in compute.describe().items() if k != "precision_requested"}
        out = Path(out) if out is not None else None
        ckpt = out / CKPT_DIR if out is not None else None
        done: Dict[int, BatchResult] = {}
        seconds_before = 0.0
        if out is not None:
            if resume:
                defaults = _field_defaults(self.config_cls)
                final = _resume_final(out, fingerprint, defaults)
                if final is not None:
                    return final
                done, seconds_before = _load_checkpoint(ckpt, fingerprint, len(sizes), defaults)
            elif (ckpt / MANIFEST).exists() or (out / "meta.json").exists():
                raise ZsqError(f"{out} already holds a synthesis run; pass resume=True (--resume) to continue "
                               "it, or choose another output directory")
            zdist.barrier()  # every rank has looked at `out` before rank 0 writes there
            if lead:
                ckpt.mkdir(parents=True, exist_ok=True)
                _write_manifest(ckpt, fingerprint, seconds_before, sorted(done))
            zdist.barrier()

        work = compute.prepare(copy.deepcopy(teacher).eval().requires_grad_(False))
        # only rank 0 keeps per-run state files (the others recompute it: same seeds, same state)
        ctx = SynthContext(work, meta, cfg, int(seed), ckpt if lead else None, lead, compute=compute)
        t0 = time.perf_counter()
        self.setup(ctx)
        mine = zdist.my_share([b for b in range(len(sizes)) if b not in done])  # all of them in one process
        for b in mine:
            size = sizes[b]
            try:
                res = self.make_batch(ctx, b, size, batch_generator(seed, b))
            except NonFiniteLoss as e:
                kept = f"; {out} keeps the {len(done)} finished batches" if out is not None else ""
                raise NonFiniteLoss(f"{self.name}: {e} (batch {b}){kept}; try a smaller learning rate "
                                    "or another seed") from None
            done[b] = res = BatchResult(res.images.detach().float().cpu(),
                                        None if res.labels is None else res.labels.cpu(), res.losses)
            if ckpt is not None:
                _save_batch(ckpt, b, res)  # every rank writes its own batches; resume reads the files
                if lead:
                    _write_manifest(ckpt, fingerprint, seconds_before + time.perf_counter() - t0, sorted(done))
        for part in zdist.gather_objects({b: done[b] for b in mine}):
            done.update(part)
        seconds = seconds_before + time.perf_counter() - t0

        result = self._assemble(ctx, done, sizes, budget, seconds, fingerprint["weights"])
        if out is not None and lead:
            result.save(out)
            _write_manifest(ckpt, fingerprint, seconds, sorted(done), complete=True)
            for f in [*ckpt.glob("batch_*.safetensors"), *ckpt.glob("state_*.safetensors")]:
                f.unlink()
        zdist.barrier()
        return result

    def _assemble(self, ctx: SynthContext, done: Dict[int, BatchResult], sizes: List[int], budget: str,
                  seconds: float, weights: str) -> SyntheticSet:
        """The batches as one SyntheticSet, with the mean losses, the Genie-form BNS and the metadata."""
        cfg, meta = ctx.cfg, ctx.meta
        images = torch.cat([done[b].images for b in range(len(sizes))])
        labels = None
        if done[0].labels is not None:
            labels = torch.cat([done[b].labels for b in range(len(sizes))])
        loss_names = sorted({k for r in done.values() for k in r.losses})
        losses = {k: float(np.mean([r.losses[k] for r in done.values() if k in r.losses])) for k in loss_names}
        try:
            bns = measure_genie_bns(ctx.teacher, images, cfg.batch_size)
        except ZsqError:  # no BN (only the noise baseline gets this far)
            bns = None
        set_meta = {
            "method": self.name, "config": dataclasses.asdict(cfg), "budget": budget, "seed": ctx.seed,
            "seconds": seconds, "images_per_second": sum(sizes) / max(seconds, 1e-9),
            "losses": losses, "bns_loss": bns, "model": meta.name, "weights_digest": weights,
            "input_size": list(meta.input_size), "mean": list(meta.mean), "std": list(meta.std),
            "num_classes": meta.num_classes, "batch_sizes": sizes, "torch": torch.__version__,
            "compute": ctx.compute.describe(),
        }
        set_meta["processes"] = zdist.world()
        return SyntheticSet(images, labels, set_meta)


# -- registry (filled by zsq.synth.__init__, which imports every built-in synthesizer) ----------
SYNTHESIZERS: Registry[type] = Registry("synthesis method")


def register_synthesizer(cls: type) -> type:
    """Class decorator: makes `cls` available as get_synthesizer(cls.name)."""
    SYNTHESIZERS.register(cls.name, cls)
    return cls


def get_synthesizer(name: str) -> Synthesizer:
    return SYNTHESIZERS.get(name)()


def list_synthesizers() -> List[str]:
    return SYNTHESIZERS.names()


# -- checkpoint files -------------------------------------------------------------------------
def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _write_manifest(ckpt: Path, fingerprint: dict, seconds: float, batches: List[int], complete=False) -> None:
    runstate.write_json(ckpt / MANIFEST, {"fingerprint": fingerprint, "seconds": seconds, "batches": batches,
                                          "complete": complete}, indent=2, sort_keys=True)


def _read_manifest(ckpt: Path) -> Optional[dict]:
    p = ckpt / MANIFEST
    return runstate.read_json(p) if p.exists() else None


def _field_defaults(config_cls: type) -> Dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(config_cls) if f.default is not dataclasses.MISSING}


def _check_fingerprint(ckpt: Path, manifest: dict, fingerprint: dict, defaults: Optional[dict] = None) -> None:
    """Refuse a checkpoint made by a different run. A config field the checkpoint does not have was added
    to zsq after it was made; new fields default to the earlier behaviour, so the checkpoint counts as
    made with that default (and differs only if the run now asks for another value)."""
    old = json.loads(json.dumps(manifest.get("fingerprint")))
    if isinstance(old, dict) and isinstance(old.get("config"), dict):
        old["config"] = dict(json.loads(json.dumps(defaults or {})), **old["config"])
    runstate.check_same_run(ckpt.parent, old, json.loads(json.dumps(fingerprint)))


def _resume_final(out: Path, fingerprint: dict, defaults: Optional[dict] = None) -> Optional[SyntheticSet]:
    manifest = _read_manifest(out / CKPT_DIR)
    if manifest is None:
        return None
    _check_fingerprint(out / CKPT_DIR, manifest, fingerprint, defaults)
    return SyntheticSet.load(out) if manifest.get("complete") else None


def batch_file(ckpt: Path, index: int) -> Path:
    return ckpt / f"batch_{index:05d}.safetensors"


def _load_checkpoint(ckpt: Path, fingerprint: dict, num_batches: int, defaults: Optional[dict] = None):
    """The finished batches: those the manifest lists and those other ranks saved (files are written
    atomically, so an existing batch file is a finished batch)."""
    manifest = _read_manifest(ckpt)
    if manifest is None:
        return {}, 0.0
    _check_fingerprint(ckpt, manifest, fingerprint, defaults)
    done = {}
    saved = {int(f.name[len("batch_"):-len(".safetensors")]) for f in ckpt.glob("batch_*.safetensors")}
    for b in sorted((set(int(b) for b in manifest.get("batches", [])) | saved) & set(range(num_batches))):
        f = batch_file(ckpt, b)
        if f.exists():
            d = runstate.load_state(f)
            done[b] = BatchResult(d["images"], d.get("labels"), dict(d["losses"]))
    return done, float(manifest.get("seconds", 0.0))


def _save_batch(ckpt: Path, index: int, res: BatchResult) -> None:
    d = {"images": res.images, "losses": dict(res.losses)}
    if res.labels is not None:
        d["labels"] = res.labels
    runstate.save_state(batch_file(ckpt, index), d)
