"""Errors that are the user's to fix: the CLI prints them as one line each and exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input (config, data, checkpoint, command line). Printed without a traceback, exit 2."""

    exit_code = 2

    def __init__(self, *lines: str):
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


class ConfigError(UserError):
    """A config problem; each line names the dotted path of the field at fault."""

    @classmethod
    def from_pydantic(cls, exc, prefix: str = "", source: str = "") -> "ConfigError":
        """One line per pydantic error: ``[source: ]path.to.field: message (got value)``."""
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required but not given"
            elif "input" in err:
                msg = f"{msg} (got {err['input']!r})"
            lines.append(f"{source + ': ' if source else ''}{loc}: {msg}")
        return cls(*lines)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose tensors do not fit the model (another config, not corruption)."""
