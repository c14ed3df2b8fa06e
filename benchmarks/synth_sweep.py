"""BNS against CPU time for one batch of Genie-D variants and ZeroQ: how the 32² quick budget was chosen.

Each configuration optimises one batch on the shared ResNet-20 for SECONDS of this thread's CPU time
(time.thread_time, so another job on the machine does not change the budget) and prints the per-layer
Genie-form BNS of its current images, measured with the plain teacher (no swing), every 10 s.
``--profile`` prints the split of one Genie-D step (generator forward+backward vs teacher) per width.

    PYTHONPATH=. python benchmarks/synth_sweep.py --seconds 60 \\
        '{"zeroq": {"kind": "zeroq"}, "g003": {"lr_g": 0.003, "lr_z": 0.3, "width": 64}}'

Keys of a genie configuration (defaults = the official code's effective setting at width 128):
lr_g (generator), lr_z (latents), width, swing, prior (per-image input prior), g_decay [every, gamma],
z_patience. zeroq: lr, patience.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import zsq.models
from zsq.assets import RESNET20, asset
from zsq.synth.bn_stats import BNStatsRecorder, measure_genie_bns
from zsq.synth.pixel_prior import PixelPrior
from zsq.synth.generators import GenieGenerator
from zsq.synth.swing import swing_copy


def run(teacher, seconds: float, kind: str = "genie", batch: int = 128, seed: int = 0, lr_g: float = 0.01,
        lr_z: float = 0.1, width: int = 128, swing: bool = True, prior: bool = True, g_decay=(5, 0.95),
        z_patience: int = 10, lr: float = 0.5, patience: int = 10, every: float = 10.0):
    """[(cpu seconds, iterations, BNS per layer)] for one batch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = swing_copy(teacher, gen) if (swing and kind == "genie") else teacher
    if kind == "genie":
        g = GenieGenerator(32, 3, 256, width=width).train()
        z = torch.randn(batch, 256, generator=gen).requires_grad_(True)
        opts = [torch.optim.Adam([z], lr=lr_z), torch.optim.Adam(g.parameters(), lr=lr_g)]
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opts[0], factor=0.1, patience=z_patience,
                                                             threshold=1e-4, min_lr=1e-4)
        decay = torch.optim.lr_scheduler.ExponentialLR(opts[1], gamma=g_decay[1])
        images = lambda: g(z)  # noqa: E731
    else:
        x = torch.randn(batch, 3, 32, 32, generator=gen).requires_grad_(True)
        opts = [torch.optim.Adam([x], lr=lr)]
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opts[0], factor=0.1, patience=patience, min_lr=1e-4)
        images = lambda: x  # noqa: E731
    log, spent, t, next_m = [], 0.0, 0, 0.0
    with BNStatsRecorder(net) as rec:
        while spent < seconds:
            t0 = time.thread_time()
            for o in opts:
                o.zero_grad(set_to_none=True)
            xx = images()
            rec.clear()
            net(xx)
            loss = rec.genie_loss() + (PixelPrior.genie().loss(xx) if kind == "genie" and prior else 0)
            if kind == "zeroq":
                loss = loss + PixelPrior.genie().batch_loss(xx)
            loss.backward()
            for o in opts:
                o.step()
            plateau.step(loss.item())
            t += 1
            if kind == "genie" and t % g_decay[0] == 0:
                decay.step()
            spent += time.thread_time() - t0
            if spent >= next_m or spent >= seconds:
                with torch.no_grad():
                    log.append((round(spent, 1), t, measure_genie_bns(teacher, images().detach(), batch)))
                next_m += every
    return log


def profile(teacher, widths=(128, 64, 32), batch: int = 128, n: int = 5) -> None:
    def timed(f):
        f()
        t0 = time.thread_time()
        for _ in range(n):
            f()
        return (time.thread_time() - t0) / n

    x = torch.randn(batch, 3, 32, 32, requires_grad=True)
    with BNStatsRecorder(teacher) as rec:
        def teacher_step():
            rec.clear()
            teacher(x)
            rec.genie_loss().backward()
        print(f"teacher forward+backward+BNS, batch {batch}: {timed(teacher_step):.3f} s")
    for w in widths:
        g = GenieGenerator(32, 3, 256, width=w).train()
        z = torch.randn(batch, 256, requires_grad=True)
        print(f"generator width {w}: forward+backward {timed(lambda: g(z).square().mean().backward()):.3f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="?", default='{"zeroq": {"kind": "zeroq"}}', help="JSON {name: options}")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    teacher = zsq.models.load("cifar10_resnet20", weights=str(asset(RESNET20))).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.profile:
        profile(teacher)
    for name, cfg in json.loads(args.configs).items():
        log = run(teacher, args.seconds, **cfg)
        print(name, " ".join(f"{s}s/{it}it:{b:.4f}" for s, it, b in log), flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
