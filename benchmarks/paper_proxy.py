"""The paper's proxy at the paper's scale, for one GPU: 5 seeds x (FP32, MX e4m3) and the two
ablations that test its mechanism, in one table.

Configuration (arXiv 2506.20752, docs/proxy.md): L=4, d=512, batch 2048, Adam lr 6e-4 constant,
9000 steps; the paper reports FP32 stable and MX (e4m3 everywhere) diverging near step 5090.
Ablations: MX with the layer-norm affine weights in fp32 (``mxfp8_e4m3,norm=fp32``: if the
mechanism is the γ quantization, this should not diverge) and norm-only MX (``norm=e4m3``, all
else fp32). Each run is ``benchmarks/proxy_search.py`` (plain loop, divergence as in
docs/proxy.md), ``--jobs`` at a time on the one device; batches are drawn on the device from
(seed, step), identical across schemes. Writes ``summary.csv`` and ``summary.md`` under
``--out``. ``--dry-run`` runs the same code at toy size on the CPU (the test suite does, so the
script cannot rot before a GPU is at hand)::

    python benchmarks/paper_proxy.py --out gpu_out/paper_proxy            # on a CUDA machine
    python benchmarks/paper_proxy.py --dry-run --out /tmp/paper_proxy     # anywhere, ~20 s
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_search  # noqa: E402  (a sibling script, not a package)

from mxprobe.atomic import write_csv  # noqa: E402

SCHEMES = {
    "fp32": "fp32",
    "mx": "mxfp8_e4m3",
    "mx_norm_fp32": "mxfp8_e4m3,norm=fp32",
    "norm_only_mx": "norm=e4m3",
}
PAPER = {"depth": 4, "width": 512, "batch_size": 2048, "lr": 6e-4, "steps": 9000}
DRY = {"depth": 2, "width": 32, "batch_size": 64, "lr": 6e-4, "steps": 40}
COLUMNS = ("run", "scheme", "seed", "diverged", "divergence_step", "final_loss", "min_loss",
           "steps_run", "wall_s")  # fmt: skip


def _one(job: tuple[str, str, int, dict, str]) -> dict:
    name, scheme, seed, size, device = job
    # Eager: on CUDA the quantizer is one Triton kernel per operand, and a compile of every
    # variant would cost more than it saves in 9000 steps (and minutes of a CPU test).
    args = ["--scheme", scheme, "--seed", str(seed), "--device", device, "--eager"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in size.items()]
    row = proxy_search.run(proxy_search.parser().parse_args(args))
    return {"run": name, **row}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_out/paper_proxy")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--runs", default=",".join(SCHEMES), help=f"subset of {list(SCHEMES)}")
    p.add_argument("--jobs", type=int, default=4, help="runs at a time on the device")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="toy size on the CPU, one seed")
    a = p.parse_args()
    size, device = (DRY, "cpu") if a.dry_run else (PAPER, a.device)
    seeds = [0] if a.dry_run else [int(s) for s in a.seeds.split(",")]
    names = a.runs.split(",")
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        p.error(f"unknown runs {unknown}; expected a subset of {list(SCHEMES)}")
    jobs = [(n, SCHEMES[n], seed, size, device) for seed in seeds for n in names]
    start = time.perf_counter()
    with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(_one, jobs))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "summary.csv", rows, COLUMNS)
    lines = [
        f"# Paper-scale proxy: {size}, device {device}, {time.perf_counter() - start:.0f} s",
        "",
        "| run | scheme | diverged | divergence steps | median final loss |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        mine = [r for r in rows if r["run"] == n]
        diverged = [r for r in mine if r["diverged"]]
        finals = sorted(r["final_loss"] for r in mine)
        steps = ", ".join(str(r["divergence_step"]) for r in diverged) or "-"
        median = finals[len(finals) // 2]
        lines.append(
            f"| {n} | `{SCHEMES[n]}` | {len(diverged)}/{len(mine)} | {steps} | {median:.4g} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
