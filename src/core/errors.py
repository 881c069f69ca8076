"""Errors that are the user's to fix: the CLI prints them as one line each and exits with code 2.

Every line is printed as one line: control characters (a newline in a value, a NUL byte, a
terminal escape) are escaped, and a line is cut at :data:`MAX_LINE` characters. Values quoted in
messages go through :func:`shown`, library messages through :func:`library_message`.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

MAX_LINE = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value, limit: int = 80) -> str:
    """A value as a message quotes it: its repr, escaped, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except Exception:  # a self-referencing or exotic value: its type is enough
        text = f"<{type(value).__name__}>"
    return shorten(_escape(text), limit)


def library_message(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` of a library's exception (no C++ backtrace)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else "out of memory" if type(exc) is MemoryError else "(no message)"
    return f"{type(exc).__name__}: {shorten(_escape(text), limit)}"


# What a library raises while building is its refusal of a value the config gave it (a range
# check, an assertion on a shape, an option it does not know), whatever the type. In the
# platform's or a user's own code only these are: the refusals that C code (torch's operators,
# the OS) raises at the Python line that called it; anything else there is a bug in that code.
REFUSALS = (ValueError, RuntimeError, OverflowError, MemoryError, OSError)
# ... and these mean code is at fault wherever they are raised (an attribute typo on a module
# is raised inside torch's ``Module.__getattr__``)
BUGS = (NameError, AttributeError, SyntaxError, NotImplementedError, RecursionError)


def library_files() -> tuple[str, ...]:
    """Path prefixes of installed and standard-library code (and ``<frozen ...>`` modules)."""
    import os
    import sys

    return tuple({sys.prefix, sys.base_prefix, os.path.dirname(os.__file__), "<"})


def raised_in_library(exc: BaseException) -> bool:
    """Was ``exc`` raised inside an installed library (or the standard library), rather than in
    the platform's or a user's own code? Judged by the innermost Python frame."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(library_files())


def is_program_error(exc: BaseException) -> bool:
    """True when ``exc`` is a bug in code (the platform's, a user's component) rather than a
    value that something refused: a NameError or AttributeError in a user's task, a TypeError
    or KeyError in a strategy. Such errors keep their traceback; refusals become one line."""
    if isinstance(exc, BUGS):
        return True
    return not (raised_in_library(exc) or isinstance(exc, REFUSALS))


TRACEBACK_HINT = " (--traceback shows where it was raised)"


class UserError(Exception):
    """Bad input (config, data, checkpoint, command line). Printed without a traceback, exit 2."""

    exit_code = 2
    origin: BaseException | None = None  # the exception it reports, printed by --traceback
    quiet = False  # set on ranks other than 0 under a launcher: rank 0 alone prints the line
    linger_s = 0.0  # how long a quiet rank waits before it exits (src/main.py)

    def __init__(self, *lines: str):
        lines = tuple(_from_worker(str(line)) for line in lines)
        self.lines = [shorten(_escape(str(line)), MAX_LINE) for line in lines if line]
        super().__init__("\n".join(self.lines))


def _from_worker(text: str) -> str:
    """A DataLoader worker's error, re-raised in the main process as ``Caught X in DataLoader
    worker process N.`` plus the worker's traceback: its own message again, the traceback's last
    line without the exception's name."""
    if not (text.startswith("Caught ") and "in DataLoader worker process" in text):
        return text
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.replace(".", "").replace("_", "").isalnum() else last


class ConfigError(UserError):
    """A config problem; each line names the dotted path of the field at fault."""

    # set when raised while loading a config: the raw mapping and where each value came from,
    # for the component checks that report every problem at once
    data: dict[str, Any] | None = None
    origins: dict[str, str] | None = None

    @classmethod
    def from_pydantic(cls, exc, prefix: str = "", source: str = "", model=None) -> ConfigError:
        """One line per pydantic error: ``[source: ]path.to.field: message (got value)``.

        With ``model`` (the pydantic model that was validated), an unknown key gets the closest
        known one as a suggestion: ``trainer.max_step: unknown key; did you mean 'max_steps'?``.
        """
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _did_you_mean(model, err["loc"])
            elif err["type"] == "missing":
                msg = "required but not given"
            elif "input" in err:
                msg = f"{msg} (got {shown(err['input'])})"
            lines.append(f"{source + ': ' if source else ''}{loc}: {msg}")
        return cls(*lines)


def _did_you_mean(model, loc: tuple) -> str:
    """``; did you mean 'x'?`` for the last part of ``loc`` among the fields of ``model`` there."""
    import difflib

    if model is None or not loc:
        return ""
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = getattr(field, "annotation", None) if field is not None else None
        import typing

        for arg in typing.get_args(model):  # Optional[Section]: the model inside
            if hasattr(arg, "model_fields"):
                model = arg
        if not hasattr(model, "model_fields"):
            return ""
    fields = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class DataError(UserError):
    """A data file that cannot be read (named in the message)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose tensors do not fit the model (another config, not corruption)."""


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (a full disk, a quota, any OS error). The partial
    folder is removed and ``latest`` still names the last committed checkpoint: the run resumes
    from it once the cause is fixed. Exit code 75 (EX_TEMPFAIL: try again later).
    ``every_rank``: every rank of the run raised it (each failed to write or saw another fail)."""

    exit_code = 75
    every_rank = False


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a one-line :class:`UserError` (exit 2),
    without the usage block: ``--help`` shows that."""

    def error(self, message: str):
        import difflib

        hint = ""
        if message.startswith("unrecognized arguments:"):
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], flags, n=1)
                if arg.startswith("-") and close:
                    hint = f"; did you mean {close[0]}?"
                    break
        raise UserError(f"{message}{hint} (see {self.prog} --help)")

    def add_imports(self) -> None:
        """``--import MODULE`` (repeatable), as every command that builds a config takes it."""
        self.add_argument(
            "--import",
            dest="imports",
            action="append",
            default=[],
            metavar="MODULE",
            help="import a module that registers components (repeatable)",
        )
