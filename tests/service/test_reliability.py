"""Fault campaign, the parts that fit the suite: hostile images and JSON against every route, an overload
burst over real HTTP. Each test waits on state (a gate on the model thread), never on time.

Longer campaigns (soak, SIGTERM under load, kill -9 during training, schemathesis) are scripts under
bench/ with their results in docs/BENCHMARKS.md; the corrupt WebDataset shard case is
tests/training/test_trainer.py::test_webdataset_shards_with_a_corrupt_shard.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from servertools import Gate, LiveServer, b64, encode, metric, settings_for, wait_for

FAST = {"max_new_tokens": 2, "min_new_tokens": 0, "num_beams": 1}


# -- a corpus of hostile and odd images ------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header claiming side x side pixels (10 G), with a few bytes of deflated zeros."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    body = zlib.compress(b"\x00" * 4096, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def odd_images(photo: Image.Image) -> dict[str, bytes]:
    """Images a server must take: each decodes to RGB."""
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [photo.rotate(angle) for angle in (0, 90, 180)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    grey16 = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 16-bit greyscale
    return {
        "1x1": encode(Image.new("RGB", (1, 1), (200, 10, 10))),
        "20000x10": encode(Image.new("RGB", (20000, 10), (10, 200, 10))),
        "cmyk_jpeg": encode(photo.convert("CMYK"), "JPEG"),
        "16bit_png": encode(grey16),
        "palette_transparency": encode(palette),
        "animated_gif": animated.getvalue(),
    }


def hostile_images(photo: Image.Image) -> dict[str, bytes]:
    """Bytes no server should decode: each must be a 4xx with the JSON error."""
    png = encode(photo)
    return {
        "truncated": png[: len(png) // 2],
        "zero_bytes": b"",
        "pdf_named_png": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
        "html": b"<!doctype html><html><body>not an image</body></html>",
        "decompression_bomb": bomb_png(),
        "png_magic_only": png[:8],
    }


# -- requests of every route carrying one image ---------------------------------------------------
def json_request(route: str, image: str) -> tuple[str, dict]:
    """(path, JSON body) for `route` with `image` (base64) as its image."""
    return {
        "caption": ("/caption", {"image": image, **FAST}),
        "vqa": ("/vqa", {"image": image, "question": "what shape is it?", **FAST}),
        "generate": ("/generate", {"image": image, "prompt": "a", **FAST}),
        "embed": ("/embed", {"images": [image]}),
        "retrieve": ("/retrieve", {"image": image, "texts": ["a circle", "a square"]}),
        "chat": (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is it?"},
                            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                        ],
                    }
                ],
                "max_tokens": 2,
            },
        ),  # fmt: skip
    }[route]


ROUTES = ("caption", "vqa", "generate", "embed", "retrieve", "chat")
UPLOAD_ROUTES = {"caption": ("/caption", "image"), "vqa": ("/vqa", "image"), "embed": ("/embed", "images")}


def assert_json_error(response: httpx.Response, low: int = 400, high: int = 499) -> None:
    assert low <= response.status_code <= high, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert isinstance(error["type"], str) and isinstance(error["message"], str)


@pytest.mark.parametrize("route", ROUTES)
def test_hostile_images_are_4xx_and_odd_ones_are_served(opt8, photos, route):
    for name, data in hostile_images(photos[0]).items():
        path, body = json_request(route, base64.b64encode(data).decode())
        response = opt8.post(path, json=body)
        assert_json_error(response)
        assert response.json()["error"]["type"] in (
            "invalid_image",
            "payload_too_large",
            "invalid_request",
        ), name
    for name, data in odd_images(photos[1]).items():
        path, body = json_request(route, base64.b64encode(data).decode())
        response = opt8.post(path, json=body)
        assert response.status_code == 200, (name, response.text[:300])
    assert opt8.get("/health").status_code == 200


@pytest.mark.parametrize("route", sorted(UPLOAD_ROUTES))
def test_hostile_uploads_with_wrong_content_types(opt8, photos, route):
    path, field = UPLOAD_ROUTES[route]
    extra = {"question": "what is it?"} if route == "vqa" else {}
    png = encode(photos[2])
    for name, data in hostile_images(photos[2]).items():
        response = opt8.post(path, data=extra, files={field: (f"{name}.png", data, "image/png")})
        assert_json_error(response)
    # The declared type is not trusted either way: the bytes decide.
    response = opt8.post(path, data=extra, files={field: ("photo.txt", png, "text/plain")})
    assert response.status_code == 200, response.text[:300]
    response = opt8.post(path, data=extra, files={field: ("a.png", b"plain text, not a PNG", "image/png")})
    assert_json_error(response)


def _nested(depth: int) -> bytes:
    return b'{"image": ' + b"[" * depth + b"]" * depth + b"}"


JSON_ROUTES = ("/caption", "/vqa", "/generate", "/embed", "/retrieve", "/v1/chat/completions")


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_deeply_nested_json_is_a_client_error(opt8, path):
    """Regression: nesting past Python's recursion limit raised RecursionError in json.loads -> 500."""
    for body in (_nested(100_000), b"[" * 200_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, _nested(500)):
        response = opt8.post(path, content=body, headers={"content-type": "application/json"})
        assert_json_error(response)
    assert opt8.get("/health").status_code == 200


HOSTILE_JSON = [
    ("/caption", {"image": "x" * 3_000_000}),  # huge string: not base64 of an image
    ("/vqa", {"image": "AAAA", "question": "q" * 1_000_000}),
    ("/generate", {"image": "AAAA", "prompt": ["not", "a", "string"]}),
    ("/caption", {"image": 12345}),
    ("/caption", {"image": {"nested": {"junk": [1, 2, {"x": None}]}}}),
    ("/caption", {"image": "AAAA", "max_new_tokens": -1}),
    ("/caption", {"image": "AAAA", "max_new_tokens": 10**30}),
    ("/caption", {"image": "AAAA", "num_beams": 0}),
    ("/caption", {"image": "AAAA", "num_beams": 10**6}),
    ("/generate", {"image": "AAAA", "prompt": "a", "do_sample": True, "temperature": -3}),
    ("/generate", {"image": "AAAA", "prompt": "a", "do_sample": True, "top_p": 7.5}),
    ("/generate", {"image": "AAAA", "prompt": "a", "min_new_tokens": 50, "max_new_tokens": 5}),
    ("/generate", {"image": "AAAA", "prompt": "a", "repetition_penalty": 1e308}),
    ("/caption", {"image": "data:image/png;base64,@@not base64@@"}),
    ("/caption", {"image": "data:image/png,rawbytes"}),
    ("/caption", {"image": "http://169.254.169.254/latest/meta-data"}),
    ("/caption", {"image": "file:///etc/passwd"}),
    ("/embed", {"images": "AAAA"}),
    ("/embed", {"images": [["AAAA"]]}),
    ("/embed", {"texts": [None, 1, {}]}),
    ("/embed", {"texts": ["a"] * 10_000}),
    ("/retrieve", {"text": "a", "images": [], "top_k": 0}),
    ("/retrieve", {"text": "a", "image": "AAAA", "texts": ["b"]}),
    ("/retrieve", {"text": {"$gt": ""}, "images": ["AAAA"]}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "root", "content": "x"}]}),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}],
                }
            ]
        },
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -4}),
]


@pytest.mark.parametrize(
    ("path", "body"), HOSTILE_JSON, ids=[f"{p}-{n}" for n, (p, _) in enumerate(HOSTILE_JSON)]
)
def test_hostile_json_is_4xx_with_the_json_error(opt8, path, body):
    assert_json_error(opt8.post(path, json=body))


@pytest.mark.parametrize(
    "raw", [b"", b"null", b"[]", b'"text"', b"\xff\xfe\x00", b"{", b'{"image": NaN}', b"1e999999"]
)
def test_malformed_bodies_every_route(opt8, raw):
    for path in JSON_ROUTES:
        response = opt8.post(path, content=raw, headers={"content-type": "application/json"})
        assert_json_error(response)


def test_overload_burst_refused_with_retry_after_and_nothing_accepted_is_lost(checkpoints, photos):
    """40 requests at once over real HTTP against a queue of 4, the model thread held by a gate: the overflow
    gets 429 + Retry-After while the gate still holds, every accepted request is answered 200 once it opens,
    no 5xx, and the server answers normally after."""
    folder = checkpoints["tiny-opt"]
    settings = settings_for(
        folder / "generation", folder / "stage1", max_batch_size=2, max_queue_size=4, max_wait_ms=0
    )
    body = {"image": b64(photos[0]), **FAST}
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        state = server.app.state.server
        with ThreadPoolExecutor(40) as pool, Gate(server.app) as gate:  # the gate opens first on exit
            futures = [pool.submit(client.post, "/caption", json=body) for _ in range(40)]
            gate.wait_taken()
            gate.wait_queued(4)
            # Every request has either been answered or is held in the server (queued or in the batch).
            batcher = state.batcher
            wait_for(
                lambda: (
                    sum(f.done() for f in futures) + state.working == 40
                    and state.working == batcher.depth + batcher._running
                ),
                "requests still arriving",
            )
            refused = [f.result() for f in futures if f.done()]
            held = state.working
            assert 5 <= held <= 6  # the batch behind the gate (1 or 2) + the 4 queued
            for response in refused:
                assert response.status_code == 429, response.text[:300]
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["error"]["type"] == "overloaded"
        answers = [f.result() for f in futures]
        codes = [r.status_code for r in answers]
        assert codes.count(200) == held and codes.count(429) == 40 - held, codes
        assert all(r.json()["caption"] is not None for r in answers if r.status_code == 200)
        after = client.post("/caption", json=body)
        assert after.status_code == 200
        metrics = client.get("/metrics").text
        assert metric(metrics, "blip2_requests_total", route="/caption", status="500") == 0
        assert metric(metrics, "blip2_requests_total", route="/caption", status="200") == held + 1
        assert metric(metrics, "blip2_dropped_requests_total", reason="deadline") == 0


def test_counting_prompt_tokens_leaves_the_batch_tokenizer_alone(opt8):
    """Regression: the event loop counted prompt tokens with the processor's own fast tokenizer while the
    model thread padded a batch with it; a fast tokenizer keeps its padding setting on the shared Rust
    object, so the count switched padding off mid-batch and mixed-length VQA batches failed (500) under load.
    Here the model thread's state is set by hand: counting must neither read nor reset it."""
    import copy

    runner = opt8.app.state.server.runner
    gen = runner.models.generation
    backend = gen.processor.tokenizer._tokenizer
    prompt = "Question: which colour is the shape, counted mid-batch? Answer:"  # never counted before
    unpadded = copy.deepcopy(gen.processor.tokenizer)
    expected = (
        len(unpadded(prompt, split_special_tokens=True)["input_ids"]) + gen.model.config.num_query_tokens
    )
    backend.enable_padding(length=48, pad_id=1, pad_token="<pad>", direction="left")  # mid-batch state
    try:
        assert runner.prompt_tokens(prompt) == expected  # not padded to 48
        assert backend.padding is not None and backend.padding["length"] == 48  # not switched off
    finally:
        backend.no_padding()


def _two_requests_on_one_connection(url: str, body: dict) -> list[bytes]:
    """Two POSTs one after the other on one keep-alive socket: the raw answers, head and body (b"" when the
    connection was closed)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (
        f"POST /caption HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    answers = []
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):
            try:
                sock.sendall(request)
                head = reader.readline()
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    head += line
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                answers.append(head + b"\r\n" + reader.read(length) if head else b"")
            except OSError:
                answers.append(b"")
    return answers


def test_failed_model_call_is_a_json_500_and_keeps_the_connection(checkpoints, photos):
    """Regression: a batch whose model call raised was answered 500 by Starlette's catch-all, which re-raises;
    uvicorn then closed the keep-alive connection and the client's next request on it failed (ReadError)."""
    folder = checkpoints["tiny-opt"]
    body = {"image": b64(photos[0]), **FAST}
    with LiveServer(settings_for(folder / "generation", folder / "stage1")) as server:
        batcher = server.app.state.server.batcher
        real, calls = batcher._run_batch, []

        def fail_once(jobs):
            calls.append(len(jobs))
            if len(calls) == 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(jobs)

        batcher._run_batch = fail_once
        first, second = _two_requests_on_one_connection(server.url, body)
    assert first.startswith(b"HTTP/1.1 500") and b'"internal_error"' in first, first[:200]
    assert b"CUDA" not in first  # nothing internal in the message
    assert second.startswith(b"HTTP/1.1 200"), second[:200]


def test_answers_while_draining_close_the_connection(checkpoints, photos):
    """Regression: while draining, answers kept their keep-alive connections open, so a client's next request
    on one raced the final shutdown and was cut off (ReadError in bench/faults.py sigterm). Now every answer
    during the drain says `Connection: close` and the server closes the socket after it."""
    folder = checkpoints["tiny-opt"]
    body = {"image": b64(photos[0]), **FAST}
    with LiveServer(settings_for(folder / "generation", folder / "stage1")) as server:
        first, _ = _two_requests_on_one_connection(server.url, body)
        assert first.startswith(b"HTTP/1.1 200")
        server.app.state.server.phase = "draining"  # what drain() sets first
        try:
            refused, after = _two_requests_on_one_connection(server.url, body)
        finally:
            server.app.state.server.phase = "ready"
    head = refused.split(b"\r\n\r\n")[0].lower()
    assert refused.startswith(b"HTTP/1.1 503") and b"retry-after:" in head and b"connection: close" in head
    assert after == b""  # the server closed the socket: the client opens a new connection and is refused


def test_request_already_in_its_handler_is_served_through_a_drain(checkpoints, photos, monkeypatch):
    """Regression: drain() stopped the batcher from taking work, so a request that had passed the route's
    check but was still decoding its image when SIGTERM came was refused with 503 instead of drained (3 of
    16 in-flight requests in bench/faults.py sigterm). A gate holds the request inside its handler."""
    import asyncio
    import threading

    from service.api.app import drain
    from service.api.deps import Parsed

    folder = checkpoints["tiny-opt"]
    entered, release, loops = threading.Event(), threading.Event(), []
    real_image = Parsed.image

    async def held_image(self, *args):
        loops.append(asyncio.get_running_loop())
        entered.set()
        await asyncio.to_thread(release.wait)
        return await real_image(self, *args)

    monkeypatch.setattr(Parsed, "image", held_image)
    body = {"image": b64(photos[0]), **FAST}
    with LiveServer(settings_for(folder / "generation", folder / "stage1")) as server:
        client = httpx.Client(base_url=server.url, timeout=120)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.post, "/caption", json=body)
            wait_for(entered.is_set, "the request did not reach its handler")
            drained = asyncio.run_coroutine_threadsafe(drain(server.app, timeout_s=120), loops[0])
            wait_for(lambda: server.app.state.server.phase == "draining", "the drain did not start")
            late = client.post("/caption", json=body)  # arrives after the drain began
            release.set()
            answer = in_flight.result()
        assert drained.result(timeout=120) is True
        client.close()
    assert late.status_code == 503 and "Retry-After" in late.headers
    assert answer.status_code == 200, answer.text[:300]
