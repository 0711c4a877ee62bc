"""Training throughput of the byte-level LLM: plain fp32 vs MX emulation, side by side, one run.

    PYTHONPATH=. python benchmarks/llm_bench.py                 # CPU: tiny, fp32 vs mxfp8_e4m3
    PYTHONPATH=. python benchmarks/llm_bench.py --compile both  # + torch path eager, compiled
    PYTHONPATH=. python benchmarks/llm_bench.py --threads 1     # shared machine: see below

Each row times full training steps (forward, backward, AdamW) on random byte windows after
warm-up steps (which absorb torch.compile's first compile) and prints tokens/s and the ratio to
the first row. Rows:

- CPU: the ``tiny`` model unconverted (fp32), converted under ``fp32`` (the wrapper's cost), and
  under ``mxfp8_e4m3`` with MX attention products on the default CPU quantizer (the native C
  kernel); ``--compile both`` adds MX rows on the torch path, eager and torch.compile'd.
Tokens per CPU-second (all threads of this process) are printed next to tokens/s: on a machine
shared with other jobs the wall clock stretches, the work does not. With tensors as small as the
tiny model's, ``--threads 1`` is usually faster on a busy machine (OpenMP threads spin-wait).

- CUDA (when present, unless ``--cpu-only``): a 124M-class model (GPT-2-small shape: 12 layers,
  d=768, context 512) under ``torch.autocast`` bf16 vs ``mxfp8_e4m3`` emulation (Triton
  quantizer).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F
from mxprobe.models.llm import LLM, LLMConfig, count_parameters

from mxprobe import kernels
from mxprobe.convert import convert
from mxprobe.kernels import set_compile


def _step_fn(model, optimizer, autocast_dtype):
    def step(x, y):
        with torch.autocast(
            x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def tokens_per_second(
    config: LLMConfig,
    scheme: str | None,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    device: str,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Training tokens per wall-clock second and per CPU second (this process, all threads) of
    ``LLM(config)``, converted under ``scheme`` (None: unconverted)."""
    torch.manual_seed(0)
    model = LLM(config).to(device)
    if scheme is not None:
        convert(model, scheme)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-15)
    step = _step_fn(model, optimizer, autocast_dtype)
    data = torch.randint(0, config.vocab_size, (warmup + steps, batch_size, config.context + 1))
    data = data.to(device)
    for i in range(warmup):
        step(data[i, :, :-1], data[i, :, 1:])
    if device == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        step(data[i, :, :-1], data[i, :, 1:])
    if device == "cuda":
        torch.cuda.synchronize()
    tokens = steps * batch_size * config.context
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - start_cpu)


def _print_rows(title: str, rows: list[tuple[str, tuple[float, float]]]) -> None:
    # CPU seconds are the steadier measure on a shared machine: other processes stretch the
    # wall clock, not the work done.
    print(f"\n{title}")
    (base, base_cpu) = rows[0][1]
    width = max(len(name) for name, _ in rows)
    print(
        f"  {''.ljust(width)}  {'tokens/s':>12}  {'ratio':>6}  {'tokens/CPU-s':>12}  {'ratio':>6}"
    )
    for name, (tps, tpc) in rows:
        ratios = f"{tps / base:6.3f}  {tpc:12,.0f}  {tpc / base_cpu:6.3f}"
        print(f"  {name.ljust(width)}  {tps:12,.0f}  {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", help="CPU model size (default tiny)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--compile",
        choices=("env", "both"),
        default="env",
        help="CPU quantizer rows: the default native kernel (env), or also the torch path "
        "eager and compiled (both)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA rows")
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  torch {torch.__version__}  "
        f"threads {torch.get_num_threads()}  cpu cores {os.cpu_count()}"
    )
    config = LLMConfig(size=args.size, mx_attention=True)
    plain = LLMConfig(size=args.size)
    common = dict(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, device="cpu")
    rows = [
        ("fp32 (unconverted, SDPA)", tokens_per_second(plain, None, **common)),
        ("fp32 (converted, MX attention off)", tokens_per_second(plain, "fp32", **common)),
    ]
    # The default CPU quantizer is the native C kernel; --compile both adds the torch path's
    # eager and torch.compile'd variants for comparison.
    variants = [("native", True, True)]
    if args.compile == "both":
        variants += [("torch path, eager", False, False), ("torch path, compiled", False, True)]
    for label, use_native, compile_on in variants:
        os.environ["MXPROBE_NATIVE"] = "1" if use_native else "0"
        set_compile(compile_on)
        state = kernels.status()
        if use_native and not state.native:
            label = f"torch path: {state.native_reason}"
        rows.append(
            (
                f"mxfp8_e4m3 + MX attention ({label})",
                tokens_per_second(config, "mxfp8_e4m3", **common),
            )
        )
    _print_rows(
        f"CPU, size {args.size} ({count_parameters(plain):,} params), batch "
        f"{args.batch_size} x {plain.context} tokens, {args.steps} timed steps",
        rows,
    )

    if args.cpu_only or not torch.cuda.is_available():
        print("\nno CUDA device: GPU rows skipped" if not args.cpu_only else "")
        return
    gpu = LLMConfig(size="L12")
    gpu_mx = LLMConfig(size="L12", mx_attention=True)
    common = dict(batch_size=args.gpu_batch_size, steps=args.gpu_steps, warmup=3, device="cuda")
    rows = [
        (
            "bf16 autocast (unconverted, SDPA)",
            tokens_per_second(gpu, None, autocast_dtype=torch.bfloat16, **common),
        ),
        ("mxfp8_e4m3 emulated (MX attention off)", tokens_per_second(gpu, "mxfp8_e4m3", **common)),
        ("mxfp8_e4m3 emulated + MX attention", tokens_per_second(gpu_mx, "mxfp8_e4m3", **common)),
    ]
    _print_rows(
        f"CUDA {torch.cuda.get_device_name()}, L12 ({count_parameters(gpu):,} params), batch "
        f"{args.gpu_batch_size} x {gpu.context} tokens",
        rows,
    )


if __name__ == "__main__":
    main()
