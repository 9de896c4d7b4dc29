"""`blip2-serve` / `python -m service`: CLI flags (which override BLIP2_* variables) -> settings -> uvicorn.

SIGTERM drains: /ready turns 503 and new requests get 503, requests in flight finish (up to
drain_timeout_s), then uvicorn shuts down. A second SIGTERM or SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys

import uvicorn
from pydantic import ValidationError

from blip2.logs import quiet_third_party_logs
from service.cli import add_settings_arguments, configure_logging
from service.settings import Settings

# `blip2-serve COMMAND ...`: a first word naming a command runs that module's `main(argv)`; anything else is
# the server's own flags. Each command has its own parser, so its --help lists its own settings only.
COMMANDS = {"gallery": "service.gallery_cli"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2-serve",
        description="Serve BLIP-2 / InstructBLIP checkpoints over HTTP. Every flag also reads from BLIP2_<NAME>. "
        "`blip2-serve gallery --help`: the gallery's bulk indexer and re-index command.",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override the environment
    )
    return add_settings_arguments(parser)


class DrainingServer(uvicorn.Server):
    """uvicorn stops listening at the first SIGTERM; we first drain, so Kubernetes sees /ready fail."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.draining = False
        self.exit_code = 0

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.draining and not self.should_exit:
            self.draining = True
            asyncio.get_event_loop().call_soon_threadsafe(
                lambda: asyncio.ensure_future(self._drain_then_exit())
            )
            return
        super().handle_exit(sig, frame)
        self.force_exit = self.force_exit or self.draining  # a second signal while draining: now

    async def _drain_then_exit(self) -> None:
        from service.app import drain

        await drain(self.config.app)
        self.should_exit = True

    def load_failed(self) -> None:
        self.exit_code = 1
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party_logs()  # before transformers is imported: torchao logs while it is
    if argv[:1] and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    return serve(argv)


def serve(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        settings = Settings(**args)
    except ValidationError as exc:
        print(f"blip2-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.model is None and settings.retrieval_model is None:
        print(
            "blip2-serve: no model given. Pass --model PATH_OR_HUB_ID (a folder written by `blip2-train`, or e.g. "
            "Salesforce/blip2-opt-2.7b) or set BLIP2_MODEL.",
            file=sys.stderr,
        )
        return 2
    from service.app import create_app  # the model stack: imported once the logs are set up

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    server = DrainingServer(config)
    app.state.server.on_load_failure = server.load_failed
    server.run()
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
