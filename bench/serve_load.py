"""Closed-loop load against a real `blip2-serve` on loopback: two settings side by side.

`--compare batching` (default): one server with batching (max_batch_size=N), one without (max_batch_size=1).
`--compare decoder`: both batching, one with `--decoder transformers` (generate()), one with `--decoder fast`.
`--compare revision --revision REV`: both batching with their default settings, one from a checkout of REV
(a `git worktree` under the bench cache), one from this tree: the whole server then and now.
For each route and concurrency the cells alternate baseline -> candidate, so both see the same machine noise. A cell: `concurrency` clients, each sending its next request as soon as the last
answer arrives, until `--requests` answers are in (bounded: at most `--cell-limit-s` per cell).

    python bench/serve_load.py                      # /caption /vqa /embed at 1, 8, 32
    python bench/serve_load.py --routes caption --concurrency 32 --requests 256
    python bench/serve_load.py --compare decoder --routes caption,vqa --concurrency 1,32
    python bench/serve_load.py --compare revision --revision 2d61f49 --routes caption,vqa --concurrency 1,32

Prints one row per cell (requests/s, p50/p95/p99 latency, errors, server mean batch size) and the
on/off throughput and p99 ratios; `--json PATH` also writes the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Server, checkout, easy_vqa_set, machine, model_folder, now, percentile, photos, png_b64  # noqa: E402


def bodies(route: str, images: list[str], questions: list[str]) -> list[dict]:
    if route == "caption":
        return [{"image": image} for image in images]
    if route == "vqa":
        return [
            {"image": image, "question": question} for image, question in zip(images, questions, strict=True)
        ]
    if route == "embed":
        return [{"images": [image]} for image in images]
    raise ValueError(route)


def batch_stats(metrics_text: str) -> tuple[float, float, float]:
    """(sum, count) of blip2_batch_size and the model's busy seconds, over all tasks: differences between two
    scrapes give the mean batch size and the share of the wall time the model thread computed."""
    total = count = busy = 0.0
    for line in metrics_text.splitlines():
        if m := re.match(r"blip2_batch_size_(sum|count)\{.*\} (\S+)", line):
            if m.group(1) == "sum":
                total += float(m.group(2))
            else:
                count += float(m.group(2))
        elif m := re.match(r"blip2_inference_duration_seconds_sum\{.*\} (\S+)", line):
            busy += float(m.group(1))
    return total, count, busy


TICKS = os.sysconf("SC_CLK_TCK")


class Connection:
    """One keep-alive HTTP/1.1 connection that sends ready-made requests and reads `Content-Length` answers.

    The load generator shares the machine's CPUs with the server it measures: httpx spent ~1.2 ms of CPU on
    each request (as much as the fast decoder's model thread per request at concurrency 32), so its cost
    decided the server's figures. This client does only what the benchmark needs (~0.1 ms)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> int:
        """Sends `request` (a whole HTTP/1.1 request) and returns the answer's status; the body is read and
        dropped. Reconnects when the server closed the connection (or answers `Connection: close`)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        if "content-length" not in headers:
            raise RuntimeError(f"an answer without Content-Length: {lines[0]!r}")
        await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection") == "close":
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def http_request(url: str, route: str, body: dict) -> bytes:
    host = urlsplit(url).netloc
    data = json.dumps(body).encode()
    return (
        f"POST /{route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds of a process's main thread, of all its other threads), user + system, from /proc. The
    server's main thread runs the event loop (HTTP, JSON, routing); the model thread is among the others."""
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / TICKS
            if task.name == str(pid):
                main += seconds
            else:
                other += seconds
    return main, other


async def cell(
    url: str, route: str, payloads: list[dict], concurrency: int, requests: int, limit_s: float, pid: int
) -> dict:
    latencies, statuses = [], {}
    issued = 0
    ready = [http_request(url, route, body) for body in payloads]
    async with httpx.AsyncClient(base_url=url, timeout=300) as scraper:
        before = batch_stats((await scraper.get("/metrics")).text)
        cpu_before, client_before = cpu_seconds(pid), time.process_time()
        started = time.perf_counter()
        stop_at = started + limit_s

        async def worker() -> None:
            nonlocal issued
            connection = Connection(*urlsplit(url).netloc.split(":"))
            while issued < requests and time.perf_counter() < stop_at:
                request = ready[issued % len(ready)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    status = str(await connection.post(request))
                except (OSError, asyncio.IncompleteReadError) as exc:
                    status = type(exc).__name__
                    await connection.close()
                latency = time.perf_counter() - t0
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    latencies.append(latency)
            await connection.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu_after, client_after = cpu_seconds(pid), time.process_time()
        after = batch_stats((await scraper.get("/metrics")).text)
    batches = after[1] - before[1]
    answered = sum(statuses.values()) or 1
    return {
        "ok": len(latencies),
        "errors": sum(v for k, v in statuses.items() if k != "200"),
        "statuses": statuses,
        "wall_s": wall,
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * percentile(latencies, 50) if latencies else None,
        "p95_ms": 1000 * percentile(latencies, 95) if latencies else None,
        "p99_ms": 1000 * percentile(latencies, 99) if latencies else None,
        "mean_batch": (after[0] - before[0]) / batches if batches else None,
        "model_busy": (after[2] - before[2]) / wall,
        # CPU milliseconds per answer: the server's event loop, its other threads (the model's among them),
        # and this load generator, which shares the CPUs.
        "cpu_ms_loop": 1000 * (cpu_after[0] - cpu_before[0]) / answered,
        "cpu_ms_threads": 1000 * (cpu_after[1] - cpu_before[1]) / answered,
        "cpu_ms_client": 1000 * (client_after - client_before) / answered,
    }


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="auto",
        help="`auto` (default model if present, else tiny-opt), `tiny-opt`, or a folder with generation/ and stage1/",
    )
    parser.add_argument("--routes", default="caption,vqa,embed")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--requests", type=int, default=0, help="answers per cell (default: max(32, 6 x concurrency))"
    )
    parser.add_argument("--cell-limit-s", type=float, default=120, help="upper bound on one cell's duration")
    parser.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batching server")
    parser.add_argument("--max-wait-ms", type=float, default=10)
    parser.add_argument(
        "--images",
        default="easy-vqa",
        help="`easy-vqa`: 256 easy-VQA test images (64x64 PNG) with their questions; `photos:SIZE`: "
        "scikit-image's photos resized to SIZE px, with easy-VQA questions",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of both servers (0: torch's default). On a small shared machine 2 intra-op threads "
        "spin against the event loop and the other tenants: 10-100x slower and erratic, so 1 by default",
    )
    parser.add_argument("--load-in-8bit", action="store_true", help="serve the LLM in 8-bit (both servers)")
    parser.add_argument(
        "--compare",
        choices=("batching", "decoder", "revision"),
        default="batching",
        help="what the two servers differ in",
    )
    parser.add_argument(
        "--revision", help="with --compare revision: the git revision to compare this tree with"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser


def payload_parts(images_arg: str) -> tuple[list[str], list[str]]:
    """(base64 images, questions) of 256 requests: easy-VQA's images, or photos of `photos:SIZE` px."""
    corpus = easy_vqa_set(256)
    questions = [question for _, question, _ in corpus]
    if images_arg == "easy-vqa":
        images = [png_b64(png) for png, _, _ in corpus]
    else:
        pictures = photos(int(images_arg.split(":")[1]))
        images = [png_b64(pictures[n % len(pictures)]) for n in range(len(corpus))]
    return images, questions


def server_modes(args: argparse.Namespace, folder: Path) -> dict[str, dict]:
    """The two servers' BLIP2_* environments, baseline first, by the name of what they differ in."""
    common = {
        "BLIP2_MODEL": str(folder / "generation"),
        "BLIP2_RETRIEVAL_MODEL": str(folder / "stage1"),
        "BLIP2_LOAD_IN_8BIT": "true" if args.load_in_8bit else "false",
        "BLIP2_MAX_QUEUE_SIZE": "256",
        "BLIP2_REQUEST_TIMEOUT_S": "600",
        "BLIP2_MAX_WAIT_MS": str(args.max_wait_ms),
        # Every image is new to the server, as in real traffic: no ViT output is reused from a cache.
        "BLIP2_VISION_CACHE_SIZE": "0",
    }
    if args.threads:
        common["OMP_NUM_THREADS"] = str(args.threads)
    batched = common | {"BLIP2_MAX_BATCH_SIZE": str(args.batch_size)}
    if args.compare == "batching":
        return {"off": common | {"BLIP2_MAX_BATCH_SIZE": "1"}, "on": batched}
    if args.compare == "decoder":
        return {
            "transformers": batched | {"BLIP2_DECODER": "transformers"},
            "fast": batched | {"BLIP2_DECODER": "fast"},
        }
    return {args.revision: batched, "this-tree": batched}


def measure(args: argparse.Namespace, servers: dict, images: list[str], questions: list[str]) -> list[dict]:
    """Every cell (route x concurrency), the servers alternating within each; one printed line per cell."""
    rows = []
    for route in args.routes.split(","):
        payloads = bodies(route, images, questions)
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            requests = args.requests or max(32, 6 * concurrency)
            for mode, server in servers.items():
                url, pid = server.url, server.process.pid
                asyncio.run(
                    cell(url, route, payloads, concurrency, concurrency, args.cell_limit_s, pid)
                )  # warm-up round
                result = asyncio.run(
                    cell(url, route, payloads, concurrency, requests, args.cell_limit_s, pid)
                )
                result |= {"route": route, "concurrency": concurrency, args.compare: mode}
                rows.append(result)
                print(
                    f"/{route:<7} c={concurrency:<3} {args.compare} {mode:<12} {result['rps']:8.2f} req/s  "
                    f"p50 {fmt(result['p50_ms']):>8} ms  p95 {fmt(result['p95_ms']):>8} ms  "
                    f"p99 {fmt(result['p99_ms']):>8} ms  errors {result['errors']} {result['statuses']}  "
                    f"mean batch {fmt(result['mean_batch'], '.2f')}  model busy {result['model_busy']:.0%}  "
                    f"CPU ms/answer: loop {result['cpu_ms_loop']:.2f} threads {result['cpu_ms_threads']:.2f} "
                    f"client {result['cpu_ms_client']:.2f}",
                    flush=True,
                )
    return rows


def print_comparison(rows: list[dict], b: str, c: str) -> None:
    """The Markdown table of baseline `b` against candidate `c`, cell by cell (rows alternate b, c)."""
    print(
        f"\n| route | concurrency | req/s {b} | req/s {c} | throughput {c}/{b} | p50 {b} (ms) | p50 {c} (ms) | "
        f"p50 {b}/{c} | p99 {b} (ms) | p99 {c} (ms) | p99 {c}/{b} | errors | mean batch {c} | model busy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for base, cand in zip(rows[0::2], rows[1::2], strict=True):
        ratio = cand["rps"] / base["rps"] if base["rps"] else float("nan")
        p50 = base["p50_ms"] / cand["p50_ms"] if cand["p50_ms"] and base["p50_ms"] else float("nan")
        p99 = cand["p99_ms"] / base["p99_ms"] if cand["p99_ms"] and base["p99_ms"] else float("nan")
        print(
            f"| /{cand['route']} | {cand['concurrency']} | {base['rps']:.2f} | {cand['rps']:.2f} | **{ratio:.2f}x** | "
            f"{fmt(base['p50_ms'])} | {fmt(cand['p50_ms'])} | **{p50:.2f}x** | {fmt(base['p99_ms'])} | "
            f"{fmt(cand['p99_ms'])} | {p99:.2f} | {base['errors']}/{cand['errors']} | {fmt(cand['mean_batch'], '.2f')} | "
            f"{base['model_busy']:.0%}/{cand['model_busy']:.0%} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    folder, label = model_folder(args.model)
    images, questions = payload_parts(args.images)
    if args.compare == "revision" and not args.revision:
        parser.error("--compare revision needs --revision")
    modes = server_modes(args, folder)
    baseline, candidate = modes
    print(f"# serve_load {now()} | model: {label} ({folder}) | images: {args.images} | machine: {machine()}")
    print(
        f"# {args.compare}: {baseline} vs {candidate}; max_batch_size={args.batch_size} (batching off: 1), "
        f"max_wait_ms={args.max_wait_ms}; server OMP_NUM_THREADS={args.threads or 'default'}"
    )
    sources = {args.revision: checkout(args.revision)} if args.compare == "revision" else {}
    servers = {mode: Server(env, source=sources.get(mode)) for mode, env in modes.items()}
    try:
        for server in servers.values():
            server.wait_ready()
        rows = measure(args, servers, images, questions)
    finally:
        codes = {mode: server.stop() for mode, server in servers.items()}
    print_comparison(rows, baseline, candidate)
    print(f"\nserver exit codes after SIGTERM: {codes}")
    if args.json:
        args.json.write_text(
            json.dumps({"date": now(), "model": label, "machine": machine(), "rows": rows}, indent=1)
        )
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
