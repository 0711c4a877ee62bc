"""How much does a precision switch perturb a healthy MX run? The measurement behind the study's
placebo (docs/study_placebo.md).

For each seed and switch step t, the MX run of ``examples/configs/proxy_cpu.yaml``'s proxy
(L=4, d=128, batch 256, Adam lr 8.5e-3) is trained to t and saved (``proxy_search.py
--save-state``); from that state each candidate switch (snapped, as the rule's is) and no switch
train the same next 50 batches. The perturbation of a switch is the mean over those 50 steps of
``|ln L_switched - ln L_unswitched|``; a (seed, t) counts only when the unswitched branch does
not diverge by t + 50. Prints one JSON line per (seed, t, candidate) and a summary table.
Eager (no torch.compile): one process reuses the model for every branch. Example::

    python benchmarks/placebo_perturbation.py --seeds 1,2,3,5 --at 250,400
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIG = ["--depth", "4", "--width", "128", "--batch-size", "256", "--lr", "0.0085",
          "--scheme", "mxfp8_e4m3", "--eager", "--threads", "1"]  # fmt: skip
WINDOW = 50
# name -> (scheme change, module glob): the rule's switch first, then the placebo candidates.
CANDIDATES = {
    "norm (the rule)": ("norm=bf16", "*"),
    "weights, all linears": ("w=bf16,w_bp=bf16", "*"),
    "activations, all linears": ("a=bf16,a_bp=bf16", "*"),
    "gradients, all linears": ("g_wgrad=bf16,g_dgrad=bf16", "*"),
    "weights, fc2 of every block": ("w=bf16,w_bp=bf16", "*fc2"),
    "weights, first block": ("w=bf16,w_bp=bf16", "*blocks.0.mlp.fc*"),
    "weights, last block": ("w=bf16,w_bp=bf16", "blocks.3.*"),
}


def _search():
    spec = importlib.util.spec_from_file_location("proxy_search", HERE / "proxy_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _losses(search, args: list[str], out: Path) -> tuple[list[float], dict]:
    row = search.run(search.parser().parse_args([*args, "--save-losses", str(out)]))
    return torch.load(out), row


def measure(seed: int, at: int, work: Path) -> list[dict]:
    search = _search()
    state = work / f"seed{seed}_at{at}.pt"
    _, row = _losses(search, [*CONFIG, "--seed", str(seed), "--steps", str(at),
                              "--save-state", str(at), "--state-file", str(state)],
                     work / "pre.pt")  # fmt: skip
    if row["diverged"] or not state.is_file():
        return [{"seed": seed, "at": at, "skipped": "diverged before t"}]
    resume = ["--resume", str(state), "--steps", str(at + WINDOW), "--threads", "1"]
    base, row = _losses(search, resume, work / "base.pt")
    if row["diverged"] or any(not math.isfinite(v) for v in base[at:]):
        return [{"seed": seed, "at": at, "skipped": "unswitched run diverged in the window"}]
    rows = []
    for name, (change, glob) in CANDIDATES.items():
        switch = ["--switch-at", str(at), "--switch-to", change, "--switch-modules", glob, "--snap"]
        branch, _ = _losses(search, [*resume, *switch], work / "branch.pt")
        gaps = [abs(math.log(b) - math.log(u)) for b, u in zip(branch[at:], base[at:], strict=True)]
        rows.append({
            "seed": seed, "at": at, "candidate": name, "change": change, "modules": glob,
            "mean_abs_log_ratio": round(statistics.fmean(gaps), 5),
            "abs_log_ratio_at_end": round(gaps[-1], 5),
        })  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3,5", help="MX seeds that do not diverge")
    p.add_argument("--at", default="250,400", help="switch steps")
    p.add_argument("--only", default="", help="candidate names separated by ; (default: all)")
    a = p.parse_args()
    if a.only:
        wanted = a.only.split(";")
        unknown = [w for w in wanted if w not in CANDIDATES]
        if unknown:
            p.error(f"unknown candidate(s) {unknown}; expected some of {list(CANDIDATES)}")
        for name in [n for n in CANDIDATES if n not in wanted]:
            del CANDIDATES[name]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in a.seeds.split(",")):
            for at in (int(t) for t in a.at.split(",")):
                for row in measure(seed, at, Path(tmp)):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    print(f"\n| candidate | change | modules | mean |ln ratio| over {WINDOW} steps: median "
          f"(quartiles) | median at t+{WINDOW} | n |\n" + "|---" * 6 + "|")  # fmt: skip
    for name, (change, glob) in CANDIDATES.items():
        mine = [r for r in rows if r.get("candidate") == name]
        if len(mine) < 2:
            continue
        means = sorted(r["mean_abs_log_ratio"] for r in mine)
        q1, q2, q3 = statistics.quantiles(means, n=4, method="inclusive")
        end = statistics.median(r["abs_log_ratio_at_end"] for r in mine)
        print(f"| {name} | `{change}` | `{glob}` | {q2:.4f} ({q1:.4f}–{q3:.4f}) | {end:.4f} | "
              f"{len(mine)} |")  # fmt: skip
    skipped = [r for r in rows if "skipped" in r]
    print(f"skipped (seed, t): {[(r['seed'], r['at'], r['skipped']) for r in skipped]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
