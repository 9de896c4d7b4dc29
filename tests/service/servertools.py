"""Helpers for the server tests: tiny checkpoints on disk, real photos, running servers, metrics.

Checkpoints are built from configs by `training` (tests may import it; `service` never does) and saved
with save_pretrained, so the server loads them through the same path a user's checkpoint takes.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data

from service.api.app import create_app
from service.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
    "cat",
)
WAIT_S = 120  # upper bound for a server to come up; a bound on a wait, never a measured figure


# -- checkpoints -------------------------------------------------------------------------------------
def build_instructblip(preset_dir: Path, out: Path) -> Path:
    """An InstructBLIP with the preset's ViT, OPT and tokenizers: the Q-Former also reads the question."""
    from transformers import (
        AutoConfig,
        AutoProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    generation = preset_dir / "generation"
    config = AutoConfig.from_pretrained(generation)
    stage1 = AutoProcessor.from_pretrained(preset_dir / "stage1")
    llm = AutoProcessor.from_pretrained(generation)
    qformer = config.qformer_config.to_dict() | {"vocab_size": len(stage1.tokenizer)}
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(
        InstructBlipConfig(
            vision_config=config.vision_config.to_dict(),
            qformer_config=qformer,
            text_config=config.text_config.to_dict(),
            num_query_tokens=config.num_query_tokens,
            image_token_index=config.image_token_index,
        )
    )
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)  # transformers starts them at zero
    model.save_pretrained(out)
    InstructBlipProcessor(
        image_processor=llm.image_processor,
        tokenizer=llm.tokenizer,
        qformer_tokenizer=stage1.tokenizer,
        num_query_tokens=config.num_query_tokens,
    ).save_pretrained(out)
    return out


# -- images ------------------------------------------------------------------------------------------
EASY_VQA_COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_facts(answers: list[str], image_ids: list[int]) -> dict[int, tuple[str, str]]:
    """easy-VQA images whose colour and shape follow directly from their own questions' answers."""
    colour, shape = {}, {}
    for answer, image in zip(answers, image_ids, strict=True):
        if answer in EASY_VQA_COLOURS:
            colour[image] = answer
        elif answer in EASY_VQA_SHAPES:
            shape[image] = answer
    return {i: (colour[i], shape[i]) for i in sorted(colour.keys() & shape.keys())}


def photo(name: str = "astronaut") -> Image.Image:
    """One of scikit-image's bundled real photos, as RGB."""
    array = getattr(data, name)()
    image = Image.fromarray(array)
    return image.convert("RGB")


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def b64(image_or_bytes, fmt: str = "PNG", data_uri: bool = False) -> str:
    raw = image_or_bytes if isinstance(image_or_bytes, bytes) else encode(image_or_bytes, fmt)
    text = base64.b64encode(raw).decode()
    return f"data:image/{fmt.lower()};base64,{text}" if data_uri else text


# -- running the app ---------------------------------------------------------------------------------
def settings_for(folder: Path | None, retrieval: Path | None = None, **overrides) -> Settings:
    values = {
        "model": str(folder) if folder else None,
        "retrieval_model": str(retrieval) if retrieval else None,
    }
    return Settings(**(values | {"load_in_8bit": False} | overrides))


def wait_ready(get) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            response = get("/ready")
            if response.status_code == 200:
                return
            if get("/health").status_code == 503:
                raise RuntimeError(f"model loading failed: {get('/health').text}")
        time.sleep(0.05)
    raise TimeoutError("the server did not become ready")


@contextlib.contextmanager
def running_app(settings: Settings) -> Iterator[TestClient]:
    """The real app, lifespan included, behind Starlette's TestClient; yields once /ready says yes."""
    with TestClient(create_app(settings)) as client:
        wait_ready(client.get)
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn serving the app in this process on a loopback port: real HTTP, and the app state in reach."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings.model_copy(update={"host": "127.0.0.1", "port": free_port()}))
        settings = self.app.state.server.settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_config=None)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        with httpx.Client(base_url=self.url) as client:
            wait_ready(client.get)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)


def start_process(
    args: list[str], env: dict[str, str] | None = None, entry: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`python -m service ARGS` (or `entry` ARGS) as a separate process; returns it and its URL once ready."""
    port = free_port()
    entry = entry or [sys.executable, "-m", "service"]
    command = [*entry, "--host", "127.0.0.1", "--port", str(port), *args]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=os.environ | {"HF_HUB_OFFLINE": "1"} | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url) as client:
            wait_ready(lambda path: _alive_get(process, client, path))
    except BaseException:
        process.kill()
        print(process.stdout.read())
        raise
    return process, url


def _alive_get(process: subprocess.Popen, client: httpx.Client, path: str) -> httpx.Response:
    if process.poll() is not None:
        raise RuntimeError(f"the server exited with {process.returncode}: {process.stdout.read()}")
    return client.get(path)


class Gate:
    """Holds the batcher's model thread busy until released: queues build up deterministically, no timing."""

    def __init__(self, app) -> None:
        self.app, self.event = app, threading.Event()

    def __enter__(self) -> Gate:
        self.app.state.server.batcher.executor.submit(self.event.wait)
        return self

    def __exit__(self, *exc) -> None:
        self.event.set()

    def wait_taken(self) -> None:
        """Block until a batch has been taken off the queue and waits behind the gate."""
        self._until(lambda batcher: batcher._running > 0, "no batch was taken")

    def wait_queued(self, count: int) -> None:
        """Block until `count` requests wait in the queue."""
        self._until(lambda batcher: batcher.depth >= count, f"fewer than {count} requests queued")

    def _until(self, condition, message: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition(self.app.state.server.batcher):
            if time.monotonic() > deadline:
                raise TimeoutError(message)
            time.sleep(0.01)


PRIMER = {"max_new_tokens": 1, "min_new_tokens": 1, "num_beams": 1}  # settings no test request uses


def post_together(client, requests: list[tuple[str, dict]], image: str) -> list[httpx.Response]:
    """Hold the model thread with a primer request, queue every request behind it, then let them run:
    requests with equal settings share batches. The primer adds one generate batch of one."""
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        with Gate(client.app) as gate:
            primer = pool.submit(client.post, "/caption", json={"image": image} | PRIMER)
            gate.wait_taken()
            futures = [pool.submit(client.post, path, json=body) for path, body in requests]
            gate.wait_queued(len(requests))
        responses = [f.result() for f in futures]
        assert primer.result().status_code == 200
    return responses


def wait_for(condition, message: str) -> None:
    """Poll `condition()` until true (bounded by WAIT_S): waiting on state, never measuring time."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        time.sleep(0.01)


def metric(text: str, name: str, **labels) -> float:
    """Value of one sample in Prometheus text output (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    target = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(target + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def milvus_server(data_dir: Path) -> Iterator[str]:
    """A Milvus-protocol server (Milvus Lite's own gRPC server) in another process; yields its URI."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "milvus-lite"), "server", "--data-dir", str(data_dir)]
    server = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: _listening(port), "the Milvus server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
