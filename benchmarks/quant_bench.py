"""Quantizer throughput per format next to ``x.clone()`` and torchao, measured in one run.

    python benchmarks/quant_bench.py [--size 4096] [--threads 2] [--reps 5] [--device cuda]

The body lives in ``mxprobe/cli/bench.py`` so that ``mxprobe bench`` runs the same thing.
"""

import sys

from mxprobe.app.cli.bench import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], prog="quant_bench.py"))
