"""How the application's parsers refuse a bad request: by raising, never by printing a usage
block and exiting, so that ``mxprobe`` (:func:`mxprobe.app.cli.errors.reported`) says it in one
line and a caller inside Python (a sweep, the study, a test) gets an exception.

- :class:`UsageError`: a mistake in what the user asked for, found before any work;
- :func:`raising_parser_kwargs`: LightningCLI ``parser_kwargs`` whose parsers raise
  ``argparse.ArgumentError`` instead of exiting.

It imports nothing (no Lightning, no argparse), so the lightest subcommand can use it.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in what the user asked for, found before any work; the message names the bad
    value and the valid choices."""


def raising_parser_kwargs(kwargs: dict, subcommands: tuple[str, ...] = ()) -> dict:
    """LightningCLI ``parser_kwargs`` whose parsers raise ``argparse.ArgumentError`` instead of
    printing their usage and exiting, on the main parser and on each subcommand's."""
    raising = {"exit_on_error": False}
    out = {**raising, **kwargs}
    for name in subcommands:
        out[name] = {**raising, **kwargs.get(name, {})}
    return out
