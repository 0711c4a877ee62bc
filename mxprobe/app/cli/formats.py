"""``mxprobe formats``: the MX element formats at a glance.

Prints the format table, then for Gaussian data the SQNR and the saturated-block fraction of
every format under every scale mode, and writes the paper's Figure 3 (left): the relative gap
between consecutive E4M3 codes against code index, with the floor-scale overflow region marked.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from mxprobe.app.cli.errors import ArgumentParser, positive_int
from mxprobe.app.parsing import UsageError
from mxprobe.atomic import atomic_open
from mxprobe.formats import MX_FORMAT_NAMES, mx_format
from mxprobe.kernels import set_compile
from mxprobe.quantize import SCALE_MODES, block_scale_exponent, quantize_mx


def format_table() -> list[dict]:
    rows = []
    for name in MX_FORMAT_NAMES:
        f = mx_format(name)
        rows.append(
            {
                "format": name,
                "bits": f.bits,
                "ebits": f.ebits,
                "mbits": f.mbits,
                "emax": f.emax,
                "emin": f.emin,
                "max_normal": f.max_norm,
                "min_normal": 2.0**f.emin if not f.is_int else f.min_subnormal,
                "min_subnormal": f.min_subnormal,
                "codes": f.num_codes,
            }
        )
    return rows


def gaussian_stats(numel: int, block_size: int, seed: int) -> list[dict]:
    """SQNR (dB) and saturated-block fraction per format and scale mode on N(0, 1) data.

    A block is saturated when its scaled max exceeds the element's max normal, so that the max
    is clipped: under the floor scale this happens whenever amax's mantissa is above the
    element's (e.g. amax in (1.75, 2) x 2^k for E4M3).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel // block_size, block_size, generator=g)
    amax = x.abs().amax(dim=-1, keepdim=True)
    signal = x.pow(2).sum()
    rows = []
    for name in MX_FORMAT_NAMES:
        f = mx_format(name)
        for mode in SCALE_MODES:
            q = quantize_mx(x, name, block_size=block_size, scale_mode=mode, backend="torch")
            s = block_scale_exponent(amax, f, mode)
            scaled_max = amax * torch.pow(2.0, -s.double()).float()
            rows.append(
                {
                    "format": name,
                    "scale_mode": mode,
                    "sqnr_db": round(float(10 * torch.log10(signal / (q - x).pow(2).sum())), 2),
                    "saturated_blocks": round(float((scaled_max > f.max_norm).float().mean()), 4),
                }
            )
    return rows


def _print_rows(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = [max(len(str(k)), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))


def run(argv: list[str], prog: str = "mxprobe formats") -> int:
    parser = ArgumentParser(
        prog=prog,
        description="Print the MX element formats, the SQNR and saturated-block fraction of each "
        "format and scale mode on Gaussian data, and plot the gap between consecutive E4M3 codes.",
    )
    parser.add_argument("--out", default="out/formats", help="directory for the PNG and CSVs")
    parser.add_argument("--numel", type=positive_int, default=1 << 20, help="Gaussian sample size")
    parser.add_argument(
        "--block-size", type=positive_int, default=32, help="MX block size (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gaussian sample")
    args = parser.parse_args(argv)
    if args.block_size > args.numel:
        raise UsageError(
            f"--block-size {args.block_size} is larger than --numel {args.numel}: no block to "
            "quantize"
        )
    set_compile(False)  # one call per variant: compiling would cost more than it saves
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    table = format_table()
    print("MX element formats (OCP MX v1.0; int8 = MXINT8, k/64)")
    _print_rows(table)
    stats = gaussian_stats(args.numel, args.block_size, args.seed)
    print(f"\nN(0,1) data, {args.numel} elements, block {args.block_size}, rounding even")
    _print_rows(stats)
    for name, rows in (("formats.csv", table), ("gaussian_sqnr.csv", stats)):
        with atomic_open(out / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    from mxprobe.app.plots import e4m3_code_gaps  # matplotlib only when drawing

    e4m3_code_gaps(out / "e4m3_code_gaps.png")
    print(
        f"\nwrote {out / 'formats.csv'}, {out / 'gaussian_sqnr.csv'}, {out / 'e4m3_code_gaps.png'}"
    )
    return 0
