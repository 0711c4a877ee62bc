"""``mxprobe study --config BASE.yaml --seeds 1-40 --out DIR [--jobs 2]``: arms trained per
seed from the same weights and batches (:mod:`mxprobe.app.study`): by default the spike rule
against its controls (five arms); ``--arm NAME=SCHEME[+RULE]`` defines others, e.g. formats.
``outcomes.csv``, ``rates.csv``, ``tests.csv`` and ``study.md`` (:mod:`mxprobe.app.study_report`)
are rebuilt after every cell. Rerunning the same command resumes: finished cells are skipped.
``--collect`` only rebuilds the tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from mxprobe.app import study as st
from mxprobe.app.cli.proxy import add_divergence_arguments


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {model or 'cpu ?'}, {os.cpu_count()} cores"


def plan(argv: list[str], prog: str) -> tuple[st.Plan, argparse.Namespace]:
    """The study ``argv`` asks for. Raises ValueError/OSError for a bad arm, seed list or config."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train arms over many seeds from the same weights and batches: by default "
        "the spike rule against its rewind-only and placebo controls and the fp32 and mx arms, "
        "or the arms --arm defines; rerunning the same command resumes.",
    )
    parser.add_argument(
        "--config", required=True, help="base LightningCLI YAML (the arms without rules)"
    )
    parser.add_argument("--seeds", default="1-40", help="e.g. 1-40 or 1,2,5 (default 1-40)")
    parser.add_argument(
        "--arms",
        default=None,
        help=f"comma-separated arms to run, built-in ({', '.join(st.ARMS)}) or defined by --arm "
        "(default: the --arm arms if any, else the built-in ones)",
    )
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=SCHEME[+RULE]",
        help="define an arm: a precision scheme and, for a rule arm, the suffix of its rule "
        "config beside the base config, e.g. nvfp4=nvfp4 or nvfp4_rule=nvfp4+intervention "
        "(reads <base>_intervention.yaml)",
    )
    parser.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="ARM=FILE",
        help="rule config of a rule arm (default: <base>_intervention.yaml, ... beside the base)",
    )
    parser.add_argument("--out", default="runs/study", help="output folder")
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once (default 2)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra LightningCLI argument for every cell, e.g. trainer.max_steps=100",
    )
    parser.add_argument("--collect", action="store_true", help="only rebuild the tables")
    add_divergence_arguments(parser)
    ns = parser.parse_args(argv)
    defined = dict(st.parse_arm(text) for text in ns.arm)
    names = (
        [a.strip() for a in ns.arms.split(",") if a.strip()]
        if ns.arms is not None
        else list(defined or st.ARMS)
    )
    arms = st.arms_named(names, defined)
    bad = [item for item in ns.rule if "=" not in item]
    if bad:
        raise ValueError(f"--rule {bad[0]!r}: expected ARM=FILE, e.g. mx_placebo=placebo.yaml")
    given = dict(item.split("=", 1) for item in ns.rule)
    base = Path(ns.config)
    configs = st.arm_configs(base, arms, st.rule_paths(base, arms, given))
    kept = [a for a in argv if a != "--collect"]
    return st.Plan(
        configs=configs,
        seeds=st.parse_seeds(ns.seeds),
        out=Path(ns.out),
        extra=[f"--{item}" for item in ns.set],
        factor=ns.factor,
        patience=ns.patience,
        command=shlex.join(["mxprobe", "study", *kept]),
        machine=_machine(),
    ), ns


def run(argv: list[str], prog: str) -> int:
    try:
        study, ns = plan(argv, prog)
    except (ValueError, OSError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if ns.collect:
        st.prepare(study.out, study.configs)
        study.rebuild()
        print(study.out / "study.md")
        return 0
    start = time.perf_counter()
    failures = study.run(ns.jobs, lambda line: print(line, flush=True))
    print(f"{study.out / 'study.md'} ({time.perf_counter() - start:.0f} s, {failures} failed)")
    return 1 if failures else 0
