"""`blip2-serve`'s one command line: `serve` (also what `blip2-serve FLAGS` runs), `gallery add` and
`gallery reindex`, each with flags made from the `Settings` fields it reads; and the log set-up they share.

Nothing here imports the model stack, so a command's `--help` stays quick and the third-party log filters are
in place before transformers (and, through it, torchao) is imported.
"""

from __future__ import annotations

import argparse
import logging
import typing
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr

from blip2.logs import quiet_transformers_progress_bars
from service.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# The server settings an offline gallery run reads: where the gallery is, the model that embeds, how images
# are read.
INDEXER_SETTINGS = (
    "gallery_dir",
    "gallery_uri",
    "gallery_token",
    "gallery_collection",
    "gallery_index",
    "gallery_optimize_rows",
    "retrieval_model",
    "model",
    "device",
    "dtype",
    "allow_pickle",
    "max_image_bytes",
    "max_image_pixels",
)

# Only flags given on the command line override BLIP2_* variables, so no flag has a default of its own.
FROM_ENVIRONMENT = argparse.SUPPRESS


def build_parser() -> argparse.ArgumentParser:
    """`blip2-serve [serve] FLAGS` and `blip2-serve gallery add|reindex FLAGS`. The server's flags also sit on
    the top level, so `blip2-serve --model M` (as the images, the k8s manifests and the docs run it) serves."""
    parser = argparse.ArgumentParser(
        prog="blip2-serve",
        description="Serve BLIP-2 / InstructBLIP checkpoints over HTTP (the default command, `serve`), or "
        "index the gallery offline (`blip2-serve gallery --help`). Every flag also reads from BLIP2_<NAME>.",
        argument_default=FROM_ENVIRONMENT,
    )
    add_settings_arguments(parser)
    commands = parser.add_subparsers(dest="command", metavar="{serve,gallery}")
    serve = commands.add_parser(
        "serve", argument_default=FROM_ENVIRONMENT, help="serve over HTTP (the default: same as no command)"
    )
    add_settings_arguments(serve)
    gallery = commands.add_parser(
        "gallery",
        help="the persistent gallery offline: bulk indexing and re-indexing",
        description="The persistent gallery offline: bulk indexing and re-indexing. Each flag also reads from "
        "BLIP2_<NAME>, as the server's do; an embedded gallery must not be open in a server.",
    )
    add_gallery_commands(
        gallery.add_subparsers(dest="gallery_command", metavar="{add,reindex}", required=True)
    )
    return parser


def add_gallery_commands(commands: argparse._SubParsersAction) -> None:
    add = commands.add_parser(
        "add",
        argument_default=FROM_ENVIRONMENT,
        help="index a folder or a JSONL manifest (resumable: run it again)",
    )
    add.add_argument("source", type=Path, help="a folder of images, or a JSONL manifest")
    reindex = commands.add_parser(
        "reindex",
        argument_default=FROM_ENVIRONMENT,
        help="re-embed every stored image with the given retrieval model",
    )
    for command in (add, reindex):
        command.add_argument(
            "--batch-size", type=int, default=32, help="images per model call and per commit"
        )
        command.add_argument("--no-progress", action="store_true", help="no progress bar (JSON lines only)")
        command.add_argument("--log-level", default="warning", help="Python logging level (default: warning)")
        add_settings_arguments(command.add_argument_group("gallery and model"), INDEXER_SETTINGS)


def parse_command(argv: list[str]) -> tuple[str, dict]:
    """The command (`serve`, `gallery add`, `gallery reindex`) and its arguments; exits 2 on bad flags."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command", None) or "serve"
    if command == "gallery":
        command = f"gallery {args.pop('gallery_command')}"
        # argparse merges the top level's flags into a subcommand's: `blip2-serve --port 1 gallery add` would
        # otherwise pass the server's --port to an offline run that ignores it.
        # (`--log-level` is a server setting and the gallery command's own flag too.)
        server_only = sorted(set(args) & set(Settings.model_fields) - {*INDEXER_SETTINGS, "log_level"})
        if server_only:
            flags = ", ".join("--" + name.replace("_", "-") for name in server_only)
            parser.error(f"{flags}: server flags, not taken by `blip2-serve {command}`")
    return command, args


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
