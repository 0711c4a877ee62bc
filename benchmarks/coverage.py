"""Share of each tiny transformers model's forward GEMM FLOPs on MX operands, share of its
parameters held by MX modules, and the routers' share of the GEMM FLOPs, as README's
"Supported models" table gives them. The check is tests/test_gemm_coverage.py's (a dispatch-level
watcher and the float64 reference quantizer), independent of mxprobe's own bookkeeping.

Run from the repository root with the dev extra installed::

    python benchmarks/coverage.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mxprobe  # noqa: E402
from tests.helpers_hf import MODELS, MORE_MODELS, pair  # noqa: E402
from tests.test_gemm_coverage import (  # noqa: E402
    GemmWatch,
    _flops,
    _is_router,
    _on_grid,
    _outputs,
    _router_weights,
)


def measure(name: str) -> str:
    model, _ = pair(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(model, "mxfp8_e4m3")
    watch = GemmWatch()
    with torch.no_grad(), watch:
        _outputs(model, name)
    routers = _router_weights(model)
    on = off = router = 0
    for a, b in watch.products:
        if _is_router(b, routers):
            router += _flops(a, b)
        elif _on_grid(a, -1) and _on_grid(b, -2):
            on += _flops(a, b)
        else:
            off += _flops(a, b)
    desc = mxprobe.describe(model)
    left = sorted({kind for _, kind, _ in desc.left})
    return (
        f"{name:12s} GEMM FLOPs on MX {100 * on / (on + off):5.1f} %  parameters in MX modules "
        f"{100 * desc.emulated_share:5.1f} %  routers {100 * router / (on + off + router):.2f} % "
        f"of GEMM FLOPs  opaque products {len(watch.opaque)}  left: {', '.join(left)}"
    )


if __name__ == "__main__":
    for name in {**MORE_MODELS, **MODELS}:
        print(measure(name))
