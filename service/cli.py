"""What the `blip2-serve` commands share: flags made from `Settings` fields, and the log set-up.

Nothing here imports the model stack, so a command's `--help` stays quick and the third-party log filters are
in place before transformers (and, through it, torchao) is imported.
"""

from __future__ import annotations

import argparse
import logging
import typing
from collections.abc import Iterable

from pydantic import SecretStr

from blip2.logs import quiet_transformers_progress_bars
from service.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def add_settings_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: Iterable[str] | None = None
) -> argparse.ArgumentParser | argparse._ArgumentGroup:
    """One `--flag` per Settings field (all of them, or those `names`), with the field's description as help.
    The parser must use `argument_default=argparse.SUPPRESS`: only flags given override BLIP2_* variables."""
    fields = Settings.model_fields
    for name in fields if names is None else names:
        field = fields[name]
        flag = "--" + name.replace("_", "-")
        kinds = set(typing.get_args(field.annotation)) or {field.annotation}
        help_text = (field.description or "").replace("%", "%%")
        if bool in kinds:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif SecretStr in kinds:
            parser.add_argument(
                flag, help=help_text + " (prefer the environment variable: flags show in `ps`)"
            )
        else:
            parser.add_argument(flag, help=help_text)
    return parser


def configure_logging(level: str) -> None:
    """The process's log: one line per record at `level`, no progress bars of transformers' own."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    quiet_transformers_progress_bars()
