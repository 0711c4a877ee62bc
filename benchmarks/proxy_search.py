"""One proxy run as a plain training loop: the search tool behind docs/proxy_cpu.md.

Same student, teacher, batches (``make_batch``), loss and Adam as ``mxprobe proxy compare``, with
the student compiled through ``mxprobe.compile_model``, but without Lightning, so a scan of many
configurations costs less; ``--switch-at N --switch-to "norm=bf16"`` amends every module's scheme
before step N (the paper's intervention experiment; ``--snap`` first sets the switched weights
to the values the old scheme's forward used, see ``mxprobe.amend_scheme``). Prints one JSON
line: the configuration, the divergence summary of ``mxprobe proxy compare`` (same rule: loss
above 10x its running minimum for 500 consecutive steps, or non-finite), wall time and LayerNorm
gamma statistics.
Stops 500 steps after a divergence starts.

``--save-state N`` writes the run's state after N steps (student weights and schemes, Adam
state, divergence tracker, probes, RNG; the data position is the step, since batch k is drawn
from (seed, k)) to ``--state-file``; ``--resume FILE`` continues from it with the saved model,
data and optimizer settings and this command's run settings (``--steps``, ``--switch-*``,
``--save-*``, probes), bit for bit as the uninterrupted run would have gone on
(tests/test_proxy_search.py). Example::

    python benchmarks/proxy_search.py --width 128 --lr 8.5e-3 --scheme mxfp8_e4m3 --seed 0 \\
        --steps 1200 --switch-at 200 --switch-to norm=bf16
    python benchmarks/proxy_search.py ... --steps 7500 --save-state 7500 --state-file s.pt
    python benchmarks/proxy_search.py --resume s.pt --steps 8500 --switch-at 7500 \\
        --switch-to norm=bf16 --snap
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from mxprobe.models.data import make_batch
from mxprobe.models.student_teacher import ProxyConfig, build_student, build_teacher

import mxprobe
from mxprobe.convert import restore_schemes, schemes_of
from mxprobe.outcome import DivergenceTracker
from mxprobe.stats import block_max_exponents, floor_overflow_count

# What a resumed run takes from its state file: everything that defines the trajectory.
RUN_KEYS = (
    "depth", "width", "batch_size", "lr", "scheme", "seed", "noise", "teacher_gain",
    "weight_decay", "beta2", "clip", "activation", "eager", "device",
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--scheme", default="fp32")
    p.add_argument("--seed", type=int, default=0, help="model seed = data seed")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.005)
    p.add_argument("--teacher-gain", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.0, help="> 0: AdamW instead of Adam")
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--clip", type=float, default=0.0, help="> 0: clip the gradient norm to this")
    p.add_argument("--activation", default="gelu")
    p.add_argument("--switch-at", type=int, default=-1)
    p.add_argument("--switch-to", default="")
    p.add_argument("--switch-modules", default="*", help="glob of the MX modules switched")
    p.add_argument("--snap", action="store_true", help="function-preserving switch")
    p.add_argument("--eager", action="store_true", help="do not torch.compile the student")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-losses", default=None, help="torch.save the loss list here")
    p.add_argument(
        "--probe-every",
        type=int,
        default=0,
        help="> 0: every N steps, record the layer-norm probes (gamma mean, share of 32-blocks in "
        "E4M3's floor-saturating zone, share with max below 1, blocks that changed binade since "
        "the last reading) and the loss into the row "
        "(and print each reading to stderr as progress)",
    )
    p.add_argument(
        "--probe-window",
        default="",
        metavar="START:END:EVERY",
        help="also probe every EVERY steps in [START, END): a dense look before a known spike "
        "(a deterministic run repeats its trajectory step for step)",
    )
    p.add_argument("--save-state", type=int, default=-1, metavar="N",
                   help="write the state after N steps to --state-file")  # fmt: skip
    p.add_argument("--state-file", default="proxy_state.pt", help="where --save-state writes")
    p.add_argument("--resume", default=None, metavar="FILE",
                   help="continue from a --save-state file")  # fmt: skip
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu: the batches of `mxprobe proxy compare` (numpy, docs/proxy_cpu.md); cuda: "
        "batches drawn on the device from (seed, step), identical across schemes, ~100x "
        "cheaper than copying numpy batches at d=512 x 2048",
    )
    return p


def _device_batch(teacher, a, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(a.device).manual_seed(a.seed * 1_000_003 + step)
    x = torch.randn(a.batch_size, a.width, generator=g, device=a.device)
    eps = torch.randn(a.batch_size, a.width, generator=g, device=a.device)
    with torch.no_grad():
        return x, teacher(x) + a.noise * eps


def _gamma_probes(student: torch.nn.Module, previous: dict) -> dict:
    """Layer-norm gamma: mean, share of 32-blocks whose max is in E4M3's floor-saturating zone
    (every gamma of such a block in [0.875, 1) * 2^k is cut to 0.875 * 2^k), share with max < 1,
    and ``crossed``: blocks whose max moved to another binade since the previous reading (each
    such move rescales the whole block's E8M0 scale by a power of two). ``previous`` holds the
    last reading's block exponents and is updated."""
    gammas = [m.weight.detach() for m in student.modules() if isinstance(m, torch.nn.LayerNorm)]
    zone, below, blocks = 0, 0, 0
    exponents = []
    for g in gammas:
        count, n = floor_overflow_count(g, "fp8_e4m3")
        zone += int(count)
        exponents.append(block_max_exponents(g))
        below += int((exponents[-1] < 0).sum())
        blocks += n
    now = torch.cat(exponents)
    before = previous.get("exponents")
    crossed = 0 if before is None else int((now != before).sum())
    previous["exponents"] = now
    mean = torch.cat(gammas).mean().item()
    return {
        "gamma_mean": round(mean, 4),
        "zone": round(zone / blocks, 3),
        "below_1": round(below / blocks, 3),
        "crossed": crossed,
    }


def _probe_window(a: argparse.Namespace) -> range:
    """The steps of ``--probe-window START:END:EVERY`` (empty without it)."""
    if not a.probe_window:
        return range(0)
    try:
        start, end, every = (int(v) for v in a.probe_window.split(":"))
    except ValueError:
        raise SystemExit(f"--probe-window wants START:END:EVERY, got {a.probe_window!r}") from None
    if every < 1 or end <= start:
        raise SystemExit(f"--probe-window {a.probe_window}: need END > START and EVERY >= 1")
    return range(start, end, every)


def _save_state(a, step, student, opt, tracker, probes, last_reading) -> None:
    state = {
        "args": {k: getattr(a, k) for k in RUN_KEYS},
        "step": step,
        "student": student.state_dict(),
        "schemes": schemes_of(student),
        "optimizer": opt.state_dict(),
        "tracker": tracker,
        "probes": probes,
        "last_reading": last_reading,
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, a.state_file)
    print(f"state after {step} steps -> {a.state_file}", file=sys.stderr, flush=True)


def _load_state(a: argparse.Namespace) -> dict:
    """The state file of ``--resume``; its run settings replace ``a``'s."""
    state = torch.load(a.resume, weights_only=False)  # our own file: pickled tracker, schemes
    for key, value in state["args"].items():
        setattr(a, key, value)
    return state


def run(a: argparse.Namespace) -> dict:
    """Train one configuration (parsed by :func:`parser`); the JSON row as a dict."""
    torch.set_num_threads(a.threads)
    state = _load_state(a) if a.resume else None
    student = build_student(ProxyConfig(a.depth, a.width, a.activation), a.seed).to(a.device)
    mxprobe.convert(student, a.scheme)
    teacher = build_teacher(a.width, a.depth, a.activation, 1234, a.teacher_gain).to(a.device)
    forward = student if a.eager else mxprobe.compile_model(student.forward)
    adam = dict(lr=a.lr, betas=(0.9, a.beta2), eps=1e-8)
    if a.weight_decay > 0:
        opt = torch.optim.AdamW(student.parameters(), weight_decay=a.weight_decay, **adam)
    else:
        opt = torch.optim.Adam(student.parameters(), **adam)
    tracker = DivergenceTracker()
    probes, last_reading = [], {}
    first = 0
    if state is not None:
        student.load_state_dict(state["student"])
        restore_schemes(student, state["schemes"])
        opt.load_state_dict(state["optimizer"])
        tracker, probes, last_reading = state["tracker"], state["probes"], state["last_reading"]
        torch.set_rng_state(state["torch_rng"])
        first = state["step"]
    window = _probe_window(a)
    start = time.perf_counter()
    for step in range(first, a.steps):
        if step == a.switch_at:
            mxprobe.amend_scheme(student, a.switch_to, a.switch_modules, snap=a.snap)
        if a.device == "cpu":
            x, y = make_batch(teacher, a.width, a.batch_size, a.seed, step, a.noise)
        else:
            x, y = _device_batch(teacher, a, step)
        loss = F.mse_loss(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), a.clip)
        opt.step()
        tracker.update(loss.item())
        if (a.probe_every > 0 and step % a.probe_every == 0) or step in window:
            reading = _gamma_probes(student, last_reading)
            probes.append({"step": step, "loss": round(loss.item(), 6), **reading})
            print(json.dumps({"scheme": a.scheme, **probes[-1]}), file=sys.stderr, flush=True)
        if step + 1 == a.save_state:
            _save_state(a, step + 1, student, opt, tracker, probes, last_reading)
        if tracker.divergence_step is not None and (
            step - tracker.divergence_step >= tracker.patience or not torch.isfinite(loss)
        ):
            break
    gammas = torch.cat(
        [m.weight.detach() for m in student.modules() if isinstance(m, torch.nn.LayerNorm)]
    )
    skip = ("save_losses", "threads", "device", "save_state", "state_file", "resume")
    row = {k: v for k, v in vars(a).items() if k not in skip}
    row.update(
        tracker.summary(), steps_run=tracker.step, wall_s=round(time.perf_counter() - start, 1)
    )
    row.update(gamma_mean=round(gammas.mean().item(), 4), gamma_std=round(gammas.std().item(), 4))
    if probes:
        row["probes"] = probes
    if a.save_losses:
        torch.save(tracker.losses, a.save_losses)
    return row


if __name__ == "__main__":
    print(json.dumps(run(parser().parse_args())), flush=True)
