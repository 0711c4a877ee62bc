"""How ``mxprobe`` reports a user's mistake: one line that names the bad value (and the valid
choices, where the raiser knows them), exit status 2, no traceback.

:func:`reported` is the one place that does it, around every subcommand (``main``). A *user
error* is a :class:`~mxprobe.app.parsing.UsageError`, or a ValueError, TypeError, OSError, YAML
or argument error, a Lightning ``MisconfigurationException``, or a library's missing requirement
(ImportError) — what configuration checks raise; anything else (an ImportError in mxprobe itself
included) is a bug and keeps its traceback. ``--traceback`` (anywhere on the command line) or
``MXPROBE_DEBUG=1`` keeps the traceback of user errors too.

Validating values here (``positive_int``, ``positive_float``, ``int_list``) keeps the argparse
message form: ``argument --size: must be a positive integer, got '0'``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from mxprobe.app.parsing import UsageError

TRACEBACK_FLAG = "--traceback"
# Where the project's own checks live: their messages name the value and the choices.
_PROJECT_PACKAGES = ("mxprobe", "mxprobe.callbacks", "mxprobe.models")
_MAX_LINES = 3
_MAX_LINE = 400


def debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--traceback``, and whether tracebacks were asked for (the flag or
    ``MXPROBE_DEBUG=1``)."""
    flag = TRACEBACK_FLAG in argv
    env = os.environ.get("MXPROBE_DEBUG", "") not in ("", "0", "false", "False")
    return [a for a in argv if a != TRACEBACK_FLAG], flag or env


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ValueError, TypeError, OSError, argparse.ArgumentError]
    yaml = sys.modules.get("yaml")
    if yaml is not None:
        types.append(yaml.YAMLError)
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
    if lightning is not None:
        types.append(lightning.MisconfigurationException)
    return tuple(types)


def _is_user_error(err: BaseException) -> bool:
    # A library's missing optional requirement (Lightning's accelerator=tpu without torch_xla)
    # is the user's to fix; an ImportError in mxprobe's own code is a bug and keeps its traceback.
    if isinstance(err, ImportError):
        return not _raised_by_project(err)
    return isinstance(err, _user_error_types())


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or during, outermost first."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return chain


@functools.cache
def _project_roots() -> tuple[str, ...]:
    # mxprobe.callbacks and mxprobe.models live outside mxprobe/ in an editable install.
    roots = []
    for name in _PROJECT_PACKAGES:
        spec = importlib.util.find_spec(name)
        roots += [str(Path(p).resolve()) + os.sep for p in spec.submodule_search_locations or ()]
    return tuple(roots)


def _raised_by_project(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_project_roots())


def _chosen(err: BaseException) -> BaseException:
    user = _user_error_types()
    ours = [e for e in _chain(err) if isinstance(e, user) and _raised_by_project(e)]
    return ours[-1] if ours else err


def _says_enough(err: BaseException) -> bool:
    """True for errors whose message is the whole story: no hint about ``--traceback``."""
    chosen = _chosen(err)
    if isinstance(chosen, OSError) and chosen.filename is not None:
        return True
    return isinstance(chosen, (UsageError, argparse.ArgumentError)) or _raised_by_project(chosen)


def message(err: BaseException) -> str:
    """A few lines for ``err``: the project's own check when a library wrapped it (jsonargparse
    re-raises a class's ValueError inside its own), else ``err``'s message."""
    chosen = _chosen(err)
    if isinstance(chosen, OSError) and chosen.filename is not None and chosen.strerror:
        text = f"{chosen.filename}: {chosen.strerror}"
    else:
        text = str(chosen) or type(chosen).__name__
    lines = _innermost([line for line in text.splitlines() if line.strip()])
    lines = [line if len(line) <= _MAX_LINE else line[:_MAX_LINE] + " ..." for line in lines]
    return "\n  ".join(lines[:_MAX_LINES] + (["..."] if len(lines) > _MAX_LINES else []))


# jsonargparse lists why a value fits none of a Union's types, these two always.
_GENERIC_ALTERNATIVES = ("Not a valid subclass of", "Expected a <class 'NoneType'>")


# jsonargparse's reason when a value is not a Literal's one value (a rule's ``kind``, say).
_LITERAL = re.compile(r"Expected a typing\.Literal\['(.*)'\]\. Got value: (.*)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _innermost(lines: list[str]) -> list[str]:
    """For jsonargparse's "Does not validate against any of the Union subtypes ... Errors:"
    message (lines with their indentation): its first line and the first specific reason,
    descending into the unions nested in that reason (a rule's trigger inside the callback's
    rules inside the trainer's callbacks) down to the reason at the bottom. When every member
    of a union refuses the same key's value as not its one Literal value (a ``kind``), that
    value and the members' values instead."""
    starts = [i for i, line in enumerate(lines) if line.strip() == "Errors:"]
    if not starts:
        return [line.strip() for line in lines]
    at = starts[0]
    depth = _indent(lines[at])
    reasons: list[list[str]] = []
    for line in lines[at + 1 :]:
        if _indent(line) <= depth:
            break
        if line.strip().startswith("- ") and _indent(line) == depth + 2:
            reasons.append([" " * (_indent(line) + 2) + line.strip()[2:]])
        elif reasons:
            reasons[-1].append(line)
    specific = [r for r in reasons if not r[0].strip().startswith(_GENERIC_ALTERNATIVES)]
    inner = [i for i in (_innermost(r) for r in specific or reasons) if i]
    literals = [_LITERAL.fullmatch(i[-1]) if len(i) > 1 else None for i in inner]
    same_key_and_value = len({(i[-2], m[2]) for i, m in zip(inner, literals, strict=True) if m})
    if len(literals) > 1 and all(literals) and same_key_and_value == 1:
        key = re.sub(r'Parser key "(.*)":', r"\1", inner[0][-2])
        choices = ", ".join(m[1] for m in literals)
        return [lines[0].strip(), f"unknown {key} {literals[0][2]!r}; expected one of {choices}"]
    chosen = inner[0] if inner else []
    return [lines[0].strip(), *chosen[-2:]]


def reported(work: Callable[[], int | None], prog: str, debug: bool = False) -> int:
    """Run ``work``; a user error becomes ``prog: error: <message>`` on stderr and status 2."""
    try:
        return int(work() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not _is_user_error(err):
            raise
        hint = "" if _says_enough(err) else f" ({TRACEBACK_FLAG} shows where)"
        print(f"{prog}: error: {message(err)}{hint}", file=sys.stderr)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are a :class:`UsageError` (one line from ``main``, with
    a pointer to ``--help``) instead of the usage block and an exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers, each once (``0,1,2``)."""
    items = [t.strip() for t in text.split(",")]
    try:
        values = [int(t) for t in items]
    except ValueError:
        bad = next(t for t in items if not _is_int(t))
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {bad!r} in {text!r}"
        ) from None
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise argparse.ArgumentTypeError(f"{duplicates} given twice in {text!r}")
    return values


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def inside(root: Path, path: Path, what: str) -> Path:
    """``path`` when it lies inside ``root``, else a UsageError naming ``what``."""
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise UsageError(f"{what} {str(path)!r} would be written outside {str(root)!r}")
    return path
