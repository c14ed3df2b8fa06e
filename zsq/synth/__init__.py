"""Data synthesis from the teacher alone (zero-shot): ZeroQ, GDFQ, Genie-D, HAST and a noise floor.

    from zsq.synth import synthesize
    data = synthesize(teacher, "genie", 256, out="runs/genie256")   # -> SyntheticSet
    data.images  # float32 (N, C, H, W) in the teacher's normalized input space

See docs/synthesis.md for the methods, budgets, the on-disk format and resume.
"""
from __future__ import annotations

from zsq.synth.base import SynthConfig, Synthesizer, get_synthesizer, list_synthesizers, register_synthesizer
from zsq.synth.dataset import SyntheticSet
from zsq.synth import gdfq, genie, hard_samples, noise, zeroq  # noqa: F401,E402  (each registers its synthesizer)
from zsq.synth.gdfq import GDFQGeneratorStream  # noqa: E402

__all__ = ["synthesize", "get_synthesizer", "list_synthesizers", "register_synthesizer", "Synthesizer",
           "SynthConfig", "SyntheticSet", "GDFQGeneratorStream"]


def synthesize(teacher, method: str, num_images: int, *, budget: str = "quick", iters: int | None = None,
               batch_size: int | None = None, seed: int = 0, out=None, resume: bool = False,
               compute=None, **options) -> SyntheticSet:
    """Make `num_images` images for `teacher` with `method` (see list_synthesizers()).

    budget: "quick" (sized for a 2-core CPU) or "paper" (the method's published iterations/sizes);
    iters / batch_size / options override single config fields (e.g. swap_lr=True for genie).
    out: directory for per-batch checkpoints and the final set (images + meta.json + grid.png);
    resume=True continues an interrupted run there to a bit-identical result.
    compute: a zsq.compute.Compute (or a dict for zsq.compute.resolve: device, precision, channels_last);
    None = cpu, fp32, NCHW (bit-reproducible).
    """
    return get_synthesizer(method).run(teacher, num_images, seed=seed, budget=budget, out=out, resume=resume,
                                       compute=compute, iters=iters, batch_size=batch_size, **options)

