"""Training-step cost of MX emulation against a plain fp32 (and, on CUDA, bf16 autocast) step.

Times forward + backward + Adam step of two models in one run:

- ``mlp``: the paper's proxy shape — ``layers`` x pre-norm residual blocks
  ``x + Linear(4d->d)(GELU(Linear(d->4d)(LayerNorm(x))))`` on a (batch, d) input;
- ``transformer``: ``torch.nn.TransformerEncoder`` (d_model 256, 4 heads, 4 layers, batch-first)
  on (16, 128, 256) inputs. Its ``nn.MultiheadAttention`` projections stay full precision
  (mxprobe cannot reach them), so its ratio understates a fully emulated transformer;
- ``moe``: a Mixtral-shaped mixture of experts (transformers' ``MixtralModel`` on input
  embeddings: d_model 256, 4 layers, 8 experts, top-2, 4 heads) on (8, 128, 256) inputs; every
  expert GEMM and attention product emulated. Needs transformers (the dev extra); not in the
  default ``--models``.

``--memory`` adds each variant's peak memory over ``--memory-steps`` training steps, relative to
fp32: on CUDA ``torch.cuda.max_memory_allocated``; on CPU (Linux) the process's peak resident
set during the steps (VmHWM, reset before them) above its size before them; each variant in a
fresh process so that one variant's peak cannot hide another's.

Variants are measured interleaved (each repetition runs one step of every variant, in rotating
order) so that load from other processes hits them alike; the table shows the median and the
minimum per step and the median ratio to fp32. Warm-up steps (the native kernel's first build, or
torch.compile of the torch path's quantizer) are timed separately. On CPU the quantizer is the
native C kernel unless ``--no-native`` (then the torch path, compiled per call for large tensors
unless ``--eager`` or ``MXPROBE_COMPILE=0``).

Run from the repository root with mxprobe installed (``pip install -e .``) or ``PYTHONPATH=.``::

    python benchmarks/train_overhead.py --steps 10
    python benchmarks/train_overhead.py --steps 3 --models mlp --scheme mx_mix
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mxprobe
from mxprobe import kernels
from mxprobe.kernels import set_compile


class PreNormMLP(nn.Module):
    """``layers`` x [x + W2(GELU(W1(LN(x))))], W1: d->4d, W2: 4d->d."""

    def __init__(self, d: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(d),
                    "fc1": nn.Linear(d, 4 * d),
                    "act": nn.GELU(),
                    "fc2": nn.Linear(4 * d, d),
                }
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b["fc2"](b["act"](b["fc1"](b["norm"](x))))
        return x


@dataclass
class Variant:
    """One way of training one model: its own copy of the weights and its own optimizer."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    autocast: bool = False
    warmup_s: float = 0.0
    times_ms: list[float] = field(default_factory=list)


def make_models(args: argparse.Namespace) -> dict[str, tuple[Callable[[], nn.Module], tuple]]:
    """{model name: (factory, input shape)}."""

    def mlp() -> nn.Module:
        return PreNormMLP(args.d, args.layers)

    def transformer() -> nn.Module:
        layer = nn.TransformerEncoderLayer(
            args.tf_d, 4, dim_feedforward=4 * args.tf_d, dropout=0.0, batch_first=True
        )
        return nn.TransformerEncoder(layer, args.tf_layers, enable_nested_tensor=False)

    def moe() -> nn.Module:
        return MixtralStack(args.tf_d, args.tf_layers)

    return {
        "mlp": (mlp, (args.batch, args.d)),
        "transformer": (transformer, (args.tf_batch, args.seq, args.tf_d)),
        "moe": (moe, (args.tf_batch // 2, args.seq, args.tf_d)),
    }


class MixtralStack(nn.Module):
    """transformers' MixtralModel on input embeddings, returning its last hidden state."""

    def __init__(self, d: int, layers: int):
        super().__init__()
        import transformers

        config = transformers.MixtralConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=16,
        )
        self.model = transformers.MixtralModel(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=x).last_hidden_state


def build_variants(
    factory: Callable[[], nn.Module], device: torch.device, scheme: str
) -> list[Variant]:
    torch.manual_seed(0)
    base = factory().to(device)
    kinds = ["fp32", scheme] + (["bf16"] if device.type == "cuda" else [])
    variants = []
    for kind in kinds:
        model = copy.deepcopy(base)
        if kind == scheme:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mxprobe.convert(model, scheme)
            for w in caught:
                print(f"  note: {w.message}")
        name = "bf16 (autocast)" if kind == "bf16" else kind
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        variants.append(Variant(name, model, optimizer, autocast=kind == "bf16"))
    return variants


def train_step(v: Variant, x: torch.Tensor, target: torch.Tensor) -> None:
    v.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=v.autocast):
        loss = F.mse_loss(v.model(x).float(), target)
    loss.backward()
    v.optimizer.step()


def timed_step(v: Variant, x: torch.Tensor, target: torch.Tensor) -> float:
    """Seconds of one synchronized training step."""
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_step(v, x, target)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_model(
    name: str, factory: Callable[[], nn.Module], shape: tuple, args, device: torch.device
) -> list[tuple[str, Variant]]:
    print(f"[{name}] input {tuple(shape)}")
    variants = build_variants(factory, device, args.scheme)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(device)
    target = torch.randn(*shape, generator=g).to(device)
    for v in variants:
        v.warmup_s = sum(timed_step(v, x, target) for _ in range(args.warmup))
        print(f"  warm-up {v.name}: {v.warmup_s:.1f} s for {args.warmup} step(s)")
    for rep in range(args.steps):
        shift = rep % len(variants)  # rotate the order: no variant always runs first
        for v in variants[shift:] + variants[:shift]:
            v.times_ms.append(1e3 * timed_step(v, x, target))
    return [(name, v) for v in variants]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux: writing 5 resets the process's peak resident set (VmHWM) to its current size, so
    # the peak read after the steps is the steps' own, not setup's.
    Path("/proc/self/clear_refs").write_text("5")


def memory_probe(args: argparse.Namespace) -> None:
    """In a fresh process: the peak memory (MB) of ``--memory-steps`` steps of one variant."""
    name, kind = args.memory_probe.split(":")
    factory, shape = make_models(args)[name]
    device = torch.device(args.device)
    variant = next(v for v in build_variants(factory, device, args.scheme) if v.name == kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(device)
    target = torch.randn(*shape, generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_peak_rss()
        before = _status_mb("VmRSS")
    for _ in range(args.memory_steps):
        train_step(variant, x, target)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _status_mb("VmHWM")
    print(json.dumps({"before_mb": before, "peak_mb": peak}))


# glibc raises its mmap threshold to the size of each large block it frees, after which freed
# tensors stay in the heap and count in the resident set; a fixed threshold shows what the live
# tensors take. Both are printed.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_memory(results: list[tuple[str, Variant]], argv: list[str]) -> dict:
    """{(model, variant name): [(peak MB, MB above setup) under glibc's defaults, and with a
    fixed mmap threshold]}, one fresh process per variant and setting."""
    out = {}
    for model, v in results:
        out[(model, v.name)] = []
        for env in ({}, FIXED_MMAP):
            done = subprocess.run(
                [sys.executable, __file__, *argv, "--memory-probe", f"{model}:{v.name}"],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **env},
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            out[(model, v.name)].append((row["peak_mb"], row["peak_mb"] - row["before_mb"]))
    return out


def print_table(results: list[tuple[str, Variant]], steps: int) -> None:
    header = ("model", "variant", "warm-up s", "median ms/step", "min ms/step", f"/fp32 n={steps}")
    rows = [header]
    fp32 = {model: v for model, v in results if v.name == "fp32"}
    for model, v in results:
        # Per-repetition ratios share the load conditions of that repetition.
        ratio = statistics.median(
            t / f for t, f in zip(v.times_ms, fp32[model].times_ms, strict=True)
        )
        rows.append(
            (
                model,
                v.name,
                f"{v.warmup_s:.1f}",
                f"{statistics.median(v.times_ms):.1f}",
                f"{min(v.times_ms):.1f}",
                f"{ratio:.2f}x",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print()
    for r in rows:
        cells = zip(r, widths, strict=True)
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per variant")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--scheme", default="mxfp8_e4m3", help="MX scheme (preset or string form)")
    p.add_argument("--models", default="mlp,transformer", help="comma-separated subset")
    p.add_argument("--eager", action="store_true", help="torch path: eager, no compile")
    p.add_argument(
        "--no-native", action="store_true", help="CPU: the torch path, not the native kernel"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d", type=int, default=512, help="MLP width")
    p.add_argument("--batch", type=int, default=2048, help="MLP batch")
    p.add_argument("--layers", type=int, default=4, help="MLP blocks")
    p.add_argument("--tf-d", type=int, default=256, help="transformer d_model")
    p.add_argument("--tf-layers", type=int, default=4, help="transformer layers")
    p.add_argument("--tf-batch", type=int, default=16, help="transformer batch")
    p.add_argument("--seq", type=int, default=128, help="transformer sequence length")
    p.add_argument("--memory", action="store_true", help="also measure peak memory per variant")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of the memory probe")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (warm-up absorbs torch.compile)")
    mxprobe.parse_scheme(args.scheme)  # a typo fails now, not after minutes of fp32 warm-up
    return args


def _quantizer_label(device: torch.device, compile_on: bool) -> str:
    if device.type == "cuda":
        return "triton"
    state = kernels.status()
    if state.native:
        return state.summary()
    return f"torch path, compile {'on' if compile_on else 'off'}"


def print_memory(memory: dict) -> None:
    print("\npeak memory during the steps, MB above the size before them (ratio to fp32)")
    print("  glibc defaults | fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072: live tensors)")
    for (model, name), settings in memory.items():
        cells = []
        for i, (peak, step) in enumerate(settings):
            ratio = step / max(memory[(model, "fp32")][i][1], 1e-9)
            cells.append(f"peak {peak:6.0f} above {step:6.0f} {ratio:5.2f}x")
        print(f"  {model:12} {name:16} " + " | ".join(cells))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.no_native:
        os.environ["MXPROBE_NATIVE"] = "0"
    if args.memory_probe:
        memory_probe(args)
        return
    device = torch.device(args.device)
    # set_compile returns the setting in force (MXPROBE_COMPILE unless overridden).
    compile_on = set_compile(False) and not args.eager
    set_compile(compile_on)
    print(
        f"torch {torch.__version__} | {platform.processor() or platform.machine()} | "
        f"device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f" | threads {torch.get_num_threads()} | scheme {args.scheme} | "
        f"quantizer {_quantizer_label(device, compile_on)} | {time.strftime('%Y-%m-%d %H:%M')}"
    )
    models = make_models(args)
    wanted = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in wanted if m not in models]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; expected some of {', '.join(models)}")
    results = []
    for name in wanted:
        factory, shape = models[name]
        results += bench_model(name, factory, shape, args, device)
    print_table(results, args.steps)
    if args.memory:
        print_memory(measure_memory(results, [a for a in argv if a != "--memory"]))


if __name__ == "__main__":
    main()
