"""``--help`` is complete: every option of every ``mxprobe`` subcommand says what it does, and
each command's description is plain text (no reStructuredText markup) that ends its sentence.

The parsers are the ones ``mxprobe ... --help`` builds, caught as they format their help; the
LightningCLI subcommands (``proxy fit``/``validate``, ``llm fit``/``validate``) take their help
from the classes' docstrings and are not walked here.
"""

import argparse

import pytest

from mxprobe.app.cli import SUBCOMMANDS, main

# The commands whose own parser is not their --help: each one's argparse subcommands.
NESTED = {"proxy": ["compare"], "llm": ["sizes"]}
COMMANDS = [[name, *([sub] if sub else [])] for name in SUBCOMMANDS
            for sub in NESTED.get(name, [None])]  # fmt: skip


def _helped(argv: list[str], monkeypatch) -> list[argparse.ArgumentParser]:
    """The parsers that formatted a help for ``mxprobe ARGV --help``."""
    seen = []
    format_help = argparse.ArgumentParser.format_help

    def recording(parser):
        seen.append(parser)
        return format_help(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", recording)
    try:
        code = main([*argv, "--help"])
    except SystemExit as done:
        code = done.code
    monkeypatch.undo()
    assert code == 0, argv
    return seen


def _problems(parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    description = (parser.description or "").strip()
    if not description.endswith("."):
        problems.append(f"{parser.prog}: description does not end a sentence: {description!r}")
    if "``" in description:
        problems.append(f"{parser.prog}: description has rst markup: {description!r}")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            problems += [
                f"{parser.prog} {choice.dest}: no help"
                for choice in action._choices_actions
                if not (choice.help or "").strip()
            ]
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            problems.append(f"{parser.prog} {name}: no help")
        elif "``" in action.help:
            problems.append(f"{parser.prog} {name}: help has rst markup")
    return problems


def test_the_walk_covers_every_subcommand():
    assert {argv[0] for argv in COMMANDS} == set(SUBCOMMANDS)


@pytest.mark.parametrize("argv", [[], *COMMANDS], ids=lambda a: " ".join(a) or "mxprobe")
def test_every_option_has_help(argv, monkeypatch):
    parsers = _helped(argv, monkeypatch)
    assert parsers, f"mxprobe {' '.join(argv)} --help built no argparse parser"
    problems = [p for parser in parsers for p in _problems(parser)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(NESTED))
def test_a_command_with_subcommands_lists_them_in_plain_text(name, capsys):
    assert main([name, "--help"]) == 0
    printed = capsys.readouterr().out
    assert "``" not in printed
    for sub in NESTED[name]:
        assert sub in printed
