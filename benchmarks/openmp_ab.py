"""The native quantizer's two thread sources side by side, in one process: torch's OpenMP team
against the Python pool (the fallback, and what forked children use).

    PYTHONPATH=. python benchmarks/openmp_ab.py [--threads 2] [--reps 30]

Before each call a small GEMM runs, so torch's OpenMP threads are as awake as they are in a
training step. Prints the best time of each source per shape and axis, in ms.
"""

from __future__ import annotations

import argparse
import time

import torch

from mxprobe import kernels
from mxprobe.quantize import quantize_mx

SHAPES = ((4096, 4096), (2048, 2048), (2048, 512), (256, 512), (128, 512))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = kernels.status()
    if state.native_threads != "openmp":
        raise SystemExit(f"no OpenMP build here: {state.summary()}")
    a = torch.randn(512, 512)
    try:
        for shape in SHAPES:
            x = torch.randn(shape)
            for axis in (-1, 0):
                best = {}
                for source in ("pool", "openmp") * 2:  # alternated: same machine state
                    kernels.set_openmp(source == "openmp")
                    for _ in range(args.reps):
                        a @ a
                        t0 = time.perf_counter()
                        quantize_mx(x, "e4m3", axis=axis)
                        took = (time.perf_counter() - t0) * 1e3
                        best[source] = min(best.get(source, took), took)
                print(f"{shape} axis {axis}: pool {best['pool']:.3f} ms, "
                      f"openmp {best['openmp']:.3f} ms")  # fmt: skip
    finally:
        kernels.set_openmp(True)


if __name__ == "__main__":
    main()
