"""Proxy training-step time, fp32 vs mxfp8_e4m3, at the CPU and the paper configuration.

One optimizer step = teacher batch + student forward/backward (``compute_loss``) + Adam, the
work ``mxprobe proxy`` does per step minus Lightning's bookkeeping. Both schemes run in the same
process, interleaved round by round, so machine load hits them alike; the ratio is the number to
read. Usage::

    python benchmarks/proxy_bench.py [--steps 20] [--paper-steps 3] [--threads 2] [--device cpu]
        [--modes eager,compiled] [--configs cpu,cpu128,paper]

``compiled`` runs both schemes through ``ProxyLitModule(compiled=True)`` (torch.compile with
exact emulated roundings); its compilation happens in the untimed warm-up steps.
"""

from __future__ import annotations

import argparse
import time

import torch
from mxprobe.models.data import ProxyDataModule
from mxprobe.models.lit import ProxyLitModule

CONFIGS = {
    "cpu": ("L=4, d=64, batch 256", dict(depth=4, width=64, batch_size=256)),
    "cpu128": ("L=4, d=128, batch 256", dict(depth=4, width=128, batch_size=256)),
    "paper": ("L=4, d=512, batch 2048", dict(depth=4, width=512, batch_size=2048)),
}
SCHEMES = ("fp32", "mxfp8_e4m3")


def _setup(cfg: dict, scheme: str, device: str, compiled: bool):
    model = ProxyLitModule(
        depth=cfg["depth"], width=cfg["width"], lr=1e-3, scheme=scheme, compiled=compiled
    )
    model.to(device)
    data = ProxyDataModule(width=cfg["width"], depth=cfg["depth"], batch_size=cfg["batch_size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, iter(data.train_dataloader()), optimizer


def _steps(model, batches, optimizer, n: int, device: str) -> float:
    start = time.perf_counter()
    for _ in range(n):
        x, y = next(batches)
        loss = model.compute_loss((x.to(device), y.to(device)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round, CPU config")
    parser.add_argument("--paper-steps", type=int, default=3, help="timed steps, paper config")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="eager", help="comma-separated: eager, compiled")
    parser.add_argument(
        "--configs", default="cpu,paper", help=f"comma-separated: {', '.join(CONFIGS)}"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    print(f"{'configuration':42s} {'fp32 s/step':>12s} {'mx s/step':>12s} {'mx / fp32':>10s}")
    for name in args.configs.split(","):
        label, cfg = CONFIGS[name]
        for mode in args.modes.split(","):
            _bench(f"{name} ({label}) {mode}", cfg, mode == "compiled", args)


def _bench(label: str, cfg: dict, compiled: bool, args) -> None:
    n = args.paper_steps if cfg["width"] >= 512 else args.steps
    runs = {s: _setup(cfg, s, args.device, compiled) for s in SCHEMES}
    for scheme in SCHEMES:
        _steps(*runs[scheme], 2, args.device)  # warm-up (and compile, where it applies)
    best = dict.fromkeys(SCHEMES, float("inf"))
    for _ in range(args.rounds):
        for scheme in SCHEMES:
            best[scheme] = min(best[scheme], _steps(*runs[scheme], n, args.device))
    ratio = best["mxfp8_e4m3"] / best["fp32"]
    print(f"{label:42s} {best['fp32']:12.4f} {best['mxfp8_e4m3']:12.4f} {ratio:10.1f}", flush=True)


if __name__ == "__main__":
    main()
