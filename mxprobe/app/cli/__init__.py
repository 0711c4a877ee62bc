"""The ``mxprobe`` command.

Each subcommand lives in its own module of this package and exposes ``run(argv, prog) -> int``;
the module is imported only when its subcommand runs, so ``mxprobe formats`` does not pay for
importing Lightning.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mxprobe.app.cli import errors

DESCRIPTION = (
    "Emulate Microscaling (MX) training exactly, watch how quantization biases it, and switch "
    "precision mid-run by rules. 'mxprobe COMMAND --help' says what each command takes."
)
# subcommand -> (module in this package, one-line help)
SUBCOMMANDS = {
    "formats": (
        "formats",
        "print the MX format table, SQNR per format, and the E4M3 code-gap plot",
    ),
    "proxy": ("proxy", "train the paper's student-teacher proxy (fit, compare)"),
    "sweep": ("sweep", "run an ablation grid of proxy runs (local processes or emitted commands)"),
    "llm": ("llm", "train / validate the OLMo-style byte-level LLM (LightningCLI)"),
    "report": ("report", "plots and report.md/report.html from run directories"),
    "study": ("study", "the spike rule against rewind-only and placebo controls over many seeds"),
    "demo": ("demo", "the end-to-end demo: FP32 vs MX vs MX with automatic intervention"),
    "bench": ("bench", "quantizer throughput benchmark"),
}


def main(argv: list[str] | None = None) -> int:
    argv, debug = errors.debug_requested(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(prog="mxprobe", description=DESCRIPTION)
        sub = parser.add_subparsers(title="subcommands", metavar="COMMAND")
        for name, (_, help_text) in SUBCOMMANDS.items():
            sub.add_parser(name, help=help_text)
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(
            f"mxprobe: unknown command {name!r}; expected one of {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return 2
    prog = f"mxprobe {name}"

    def work() -> int | None:
        module = importlib.import_module(f"mxprobe.app.cli.{SUBCOMMANDS[name][0]}")
        return module.run(rest, prog=prog)

    return errors.reported(work, prog, debug)


if __name__ == "__main__":
    sys.exit(main())
