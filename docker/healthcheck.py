"""Container health probe: GET a path of the local server, exit 0 on HTTP 200, 1 otherwise.

Used by the image's HEALTHCHECK (`/health`) and by compose (`/ready`). Standard library only, so the
image needs no curl. The port comes from BLIP2_PORT, like the server's own.

    python healthcheck.py [PATH] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="/health")
    parser.add_argument("--timeout", type=float, default=4.0)
    args = parser.parse_args(argv)
    port = os.environ.get("BLIP2_PORT", "8000")
    url = f"http://127.0.0.1:{port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
