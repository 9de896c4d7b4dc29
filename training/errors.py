"""Errors in what a user gave a command (a missing manifest, a bad line in one): `blip2-train` prints them as
one line naming the file, with no traceback, and exits with status 2."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A file or value given to a command that it cannot use; the message names it and says why."""


def check_readable(path: str | Path, what: str = "manifest") -> None:
    """Raise InputError unless `path` is a file this process can open (before any model is loaded)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
