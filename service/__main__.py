"""`blip2-serve` / `python -m service`: the command line (service/cli.py) -> the command it names. `serve` (the
default): flags (which override BLIP2_* variables) -> settings -> uvicorn; `gallery add|reindex`:
service/gallery_cli.py.

SIGTERM drains: /ready turns 503 and new requests get 503, requests in flight finish (up to
drain_timeout_s), then uvicorn shuts down. A second SIGTERM or SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvicorn
from pydantic import ValidationError

from blip2.logs import quiet_third_party_logs
from service.cli import configure_logging, parse_command
from service.settings import Settings


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
        from service.api.app import drain

        await drain(self.config.app)
        self.should_exit = True

    def load_failed(self) -> None:
        self.exit_code = 1
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party_logs()  # before transformers is imported: torchao logs while it is
    command, args = parse_command(argv)
    if command == "serve":
        return serve(args)
    from service.gallery_cli import run  # the model stack: imported once the log filters are in place

    return run(command.removeprefix("gallery "), args)


def serve(args: dict) -> int:
    """The server, from the flags given (the rest from BLIP2_* variables); its exit status."""
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
    from service.api.app import create_app  # the model stack: imported once the logs are set up

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    server = DrainingServer(config)
    app.state.server.on_load_failure = server.load_failed
    server.run()
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
