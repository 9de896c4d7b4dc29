"""Shared helpers of the benchmark scripts: which model, real photos, a `blip2-serve` process on loopback.

Every script prints which model folder produced its figures: the packaged default model
(`service/default_model/`) when it exists, otherwise the random `tiny-opt` preset saved to a cache folder.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "service" / "default_model"
CACHE = Path(os.environ.get("BLIP2_BENCH_CACHE", "/tmp/blip2-bench"))
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "retina",
    "cat",
    "hubble_deep_field",
)
SERVE = Path(sys.executable).parent / "blip2-serve"


def model_folder(choice: str = "auto") -> tuple[Path, str]:
    """(folder with `generation/` and `stage1/`, a label for the report). `auto`: the default model if present."""
    if choice not in ("auto", "tiny-opt"):
        return Path(choice), Path(choice).name
    if choice == "auto" and (DEFAULT_MODEL / "generation").is_dir():
        return DEFAULT_MODEL, "default_model (service/default_model)"
    folder = CACHE / "tiny-opt"
    if not (folder / "generation" / "config.json").exists():
        from training.assemble import preset

        preset("tiny-opt").save(folder)
    return folder, "tiny-opt preset (random weights)"


def photos(size: int = 224) -> list:
    """scikit-image's real photos, resized, as RGB PIL images."""
    from PIL import Image
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size)) for name in PHOTOS]


def easy_vqa_set(count: int = 64) -> list[tuple[bytes, str, str]]:
    """The first `count` easy-VQA test questions as (64x64 PNG bytes, question, answer): the default model's data."""
    from easy_vqa import get_test_image_paths, get_test_questions

    questions, answers, image_ids = get_test_questions()
    paths = get_test_image_paths()
    return [(Path(paths[image_ids[n]]).read_bytes(), questions[n], answers[n]) for n in range(count)]


def png_b64(image) -> str:
    """A PIL image or PNG bytes -> base64 text."""
    if isinstance(image, bytes):
        return base64.b64encode(image).decode()
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} CPUs visible, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`blip2-serve` as a child process on a free loopback port; `env` holds BLIP2_* settings. `source`: a
    checkout of the project (another revision) whose `service` package to run instead of this one's."""

    def __init__(self, env: dict[str, str], log_path: Path | None = None, source: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or CACHE / f"server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = os.environ | {"HF_HUB_OFFLINE": "1", "BLIP2_LOG_LEVEL": "warning"} | env
        # `python -m service` from the checkout's folder imports that checkout's package first.
        command = [str(SERVE)] if source is None else [sys.executable, "-m", "service"]
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=source or REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, limit_s: float = 300) -> Server:
        deadline = time.monotonic() + limit_s
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/ready").status_code == 200:
                        return self
                time.sleep(0.1)
        raise TimeoutError(f"server not ready within {limit_s} s; see {self.log_path}")

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def checkout(revision: str) -> Path:
    """A detached worktree of `revision` under the bench cache (made once; the model folder is this tree's)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    folder = CACHE / f"worktree-{commit[:12]}"
    if not folder.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=REPO, check=True)
    return folder


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark's child process: offline, no tokenizer threads of its own."""
    return os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"} | extra


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (this one by default), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


# -- vectors of a gallery: synthetic ones and the exact max-sim ranking they are judged against -----------
QUERIES, DIM = 32, 256  # BLIP-2's query vectors per image and the ITC space


def synthetic(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 32, 256) unit vectors; an image's 32 share a direction, as BLIP-2's query vectors do."""
    centre = rng.normal(size=(count, 1, DIM)).astype(np.float32)
    vectors = centre + 0.7 * rng.normal(size=(count, QUERIES, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def synthetic_texts(count: int) -> np.ndarray:
    """(count, 256) random unit "text" vectors, the same in every benchmark (seed 1)."""
    texts = np.random.default_rng(1).normal(size=(count, DIM)).astype(np.float32)
    return texts / np.linalg.norm(texts, axis=1, keepdims=True)


def synthetic_gallery(count: int, batch: int = 256) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first, vectors) of `count` synthetic images in batches, the same in every benchmark."""
    rng = np.random.default_rng(0)
    for start in range(0, count, batch):
        yield start, synthetic(rng, min(batch, count - start))


def max_sim(vectors: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """(texts, images) ITC scores: the best cosine of each text with any of an image's query vectors."""
    return np.einsum("nqd,td->tnq", vectors.astype(np.float32), texts).max(axis=2)


def recall_at(found: list[int], exact: np.ndarray, k: int = 10, tie: float = 1e-4) -> float:
    """Share of `found` (image indices) whose exact score reaches the k-th best exact score, ties within `tie`."""
    kth = np.partition(exact, len(exact) - k)[len(exact) - k]
    return sum(exact[i] >= kth - tie for i in found[:k]) / k


def disk_bytes(folder: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(folder)], capture_output=True, text=True).stdout.split()[0])
