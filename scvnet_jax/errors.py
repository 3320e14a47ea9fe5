"""Every error a user can cause, one type: `ScvnetError`.

Each command-line entry point catches `ScvnetError` alone and prints its message as one
`error: ...` line with exit status `exit_code` (2 for bad input; 3 for a training run that
went non-finite), never a traceback. The message names the file, field or value at fault
and what was expected. The subclasses say where the problem was found; they also derive
from ValueError / RuntimeError so code that caught those before keeps working.
"""
from __future__ import annotations


class ScvnetError(Exception):
    """Base class of user-facing errors; `exit_code` is the CLI exit status."""
    exit_code = 2


class InputError(ScvnetError, ValueError):
    """Bad input data (a missing or corrupt image, a malformed ground-truth file, a data set
    that is not prepared, ...)."""


class StaleIdsError(InputError):
    """Ids of an index the search app no longer keeps (the folder was re-indexed since the
    search that gave them, and several times more); the REST API answers 409."""


class CheckpointError(ScvnetError, ValueError):
    """A checkpoint or model directory could not be read or does not fit the model."""


class ConfigError(ScvnetError, ValueError):
    """A config field (or command-line flag) has a value the run cannot use."""


class OutputError(ScvnetError, OSError):
    """A result, cache or checkpoint could not be written (disk full, no permission); the
    partial file was removed."""


class NonFiniteLossError(ScvnetError, RuntimeError):
    """Training produced a NaN/Inf loss or parameters; the run stopped without saving them."""
    exit_code = 3


def first_few(items, n: int = 3) -> str:
    """'a, b, c (and 7 more)': the first `n` items of a list, for an error message."""
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


__all__ = ["first_few", "ScvnetError", "InputError", "CheckpointError", "ConfigError",
           "OutputError", "NonFiniteLossError"]
