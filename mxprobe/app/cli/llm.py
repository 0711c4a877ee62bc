"""``mxprobe llm``: train or validate the OLMo-style byte-level LLM through LightningCLI.

    mxprobe llm fit --config examples/configs/llm_tiny_cpu.yaml [--trainer.max_steps=200 ...]
    mxprobe llm validate --config FILE.yaml [--ckpt_path CKPT]
    mxprobe llm sizes [--flops 1e18]

Model (``mxprobe.models.lit_llm.LLMModule``: architecture, ``scheme``, ``overrides``, optimizer),
data (``ByteTextDataModule``) and trainer (callbacks, logger, strategy) all come from one YAML;
any key can be overridden on the command line. The data's context is linked to the model's.
The same YAML scales out with ``--trainer.strategy=ddp --trainer.devices=N``.
"""

from __future__ import annotations

import sys
import warnings

import torch
from lightning.pytorch.cli import LightningCLI

from mxprobe.app.cli.errors import ArgumentParser, positive_float
from mxprobe.app.lightning_parts import AtomicSaveConfig, CheckedCheckpointPath
from mxprobe.app.parsing import raising_parser_kwargs
from mxprobe.callbacks import RunRecorder
from mxprobe.models.lit_llm import ByteTextDataModule, LLMModule

LIGHTNING_SUBCOMMANDS = ("fit", "validate")


class LLMCLI(CheckedCheckpointPath):
    """LightningCLI for :class:`LLMModule` + :class:`ByteTextDataModule` with ``fit`` and
    ``validate`` only, the data's context linked to the model's, and a top-level
    ``num_threads`` (``torch.set_num_threads`` before anything is built)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_SUBCOMMANDS}

    def instantiate_trainer(self, **kwargs):
        # Every LLM run keeps its record, whatever callbacks its YAML lists.
        trainer = super().instantiate_trainer(**kwargs)
        RunRecorder.of(trainer)
        return trainer

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--num_threads",
            type=int | None,
            default=None,
            help="torch.set_num_threads for this process (None: torch's default). Small models "
            "on shared CPUs run faster with 1: OpenMP threads spin-wait for busy cores.",
        )
        parser.link_arguments("model.context", "data.context", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("num_threads"):
            torch.set_num_threads(config.num_threads)


def llm_cli(
    args: list[str], *, prog: str = "mxprobe llm", cli_class: type[LLMCLI] = LLMCLI, **kwargs
) -> LLMCLI:
    """Build (and unless ``run=False`` run) the CLI with mxprobe's settings; ``kwargs`` go to
    LightningCLI."""
    return cli_class(
        LLMModule,
        ByteTextDataModule,
        args=args,
        parser_kwargs=raising_parser_kwargs({"prog": prog}, LIGHTNING_SUBCOMMANDS),
        save_config_callback=AtomicSaveConfig,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        **kwargs,
    )


def _sizes(argv: list[str], prog: str) -> int:
    from mxprobe.models.llm import SIZES, size_table

    parser = ArgumentParser(
        prog=f"{prog} sizes",
        description="Named model sizes with parameter counts (and the steps a FLOPs budget buys "
        "at 6 N D with 512 x 512-token batches, as the paper's sweep).",
    )
    parser.add_argument("names", nargs="*", help=f"sizes to show (default: {', '.join(SIZES)})")
    parser.add_argument(
        "--flops", type=positive_float, default=None, help="training FLOPs budget (> 0)"
    )
    args = parser.parse_args(argv)
    print(size_table(args.names or None, flops=args.flops))
    return 0


def run(argv: list[str], prog: str) -> int:
    if argv[:1] == ["sizes"]:
        return _sizes(argv[1:], prog)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.replace("mxprobe llm", prog).replace("``", ""))
        return 0
    if not argv or argv[0] not in LIGHTNING_SUBCOMMANDS:
        got = repr(argv[0]) if argv else "nothing"
        print(
            f"{prog}: expected a subcommand ({', '.join(LIGHTNING_SUBCOMMANDS)}, sizes), got {got}",
            file=sys.stderr,
        )
        return 2
    # The args are sys.argv's tail when run as `mxprobe llm ...`; LightningCLI warns about
    # receiving both, but sys.argv must stay whole: DDP re-launches the same command line.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    llm_cli(argv, prog=prog)
    return 0
