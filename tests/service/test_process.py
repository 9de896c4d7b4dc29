"""The server as users run it: a separate process started by `blip2-serve` / `python -m service`, driven
over loopback HTTP by the official `openai` client, and stopped with SIGTERM while it is busy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from servertools import REPO, b64, metric, start_process, wait_for

from service.__main__ import main
from service.cli import build_parser
from service.settings import Settings

SERVE = Path(sys.executable).parent / "blip2-serve"


def test_cli_flags_override_environment(monkeypatch):
    monkeypatch.setenv("BLIP2_MODEL", "/from/env")
    monkeypatch.setenv("BLIP2_PORT", "9000")
    monkeypatch.setenv("BLIP2_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("BLIP2_ALLOWED_URL_HOSTS", "images.example.com, cdn.example.com")
    args = vars(
        build_parser().parse_args(["--model", "/from/cli", "--no-load-in-8bit", "--max-wait-ms", "5"])
    )
    settings = Settings(**args)
    assert settings.model == "/from/cli" and settings.port == 9000 and settings.max_batch_size == 4
    assert settings.load_in_8bit is False and settings.max_wait_ms == 5
    assert settings.allowed_url_hosts == ["images.example.com", "cdn.example.com"]
    assert Settings().load_in_8bit is None  # unset: on when a GPU is present
    monkeypatch.setenv("BLIP2_API_KEY", "zq-secret-77")
    assert "zq-secret-77" not in repr(Settings())  # SecretStr: the key never shows in logs or reprs


def test_no_model_is_a_clear_message(monkeypatch, capsys, tmp_path):
    for name in [k for k in os.environ if k.startswith("BLIP2_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr("service.settings.DEFAULT_MODEL_DIR", tmp_path / "no-packaged-model")
    assert main([]) == 2
    error = capsys.readouterr().err
    assert "--model" in error and "BLIP2_MODEL" in error
    assert main(["--model", "m", "--port", "x"]) == 2 and "port" in capsys.readouterr().err


def test_load_failure_exits_non_zero(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model", str(tmp_path / "nope"), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "does not exist" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def served(checkpoints):
    """`blip2-serve` on the folders `blip2-train` writes, in its own process."""
    folder = checkpoints["tiny-opt"]
    # Drain bound far above the work in flight: on a loaded machine the test must not race it.
    env = {"BLIP2_MAX_BATCH_SIZE": "1", "BLIP2_LOAD_IN_8BIT": "false", "BLIP2_DRAIN_TIMEOUT_S": "600"}
    process, url = start_process(
        ["--model", str(folder / "generation"), "--retrieval-model", str(folder / "stage1")],
        env,
        entry=[str(SERVE)],
    )
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()


def test_openai_client(served, photos):
    _, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-opt"]
    image = b64(photos[0], data_uri=True)
    completion = client.chat.completions.create(
        model="tiny-opt",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                         {"type": "image_url", "image_url": {"url": image}}]},
        ],
        max_tokens=6,
    )  # fmt: skip
    assert completion.object == "chat.completion"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert 1 <= completion.usage.completion_tokens <= 6
    # stream=True: the same greedy answer, arriving token by token as server-sent events
    chunks = list(
        client.chat.completions.create(
            model="tiny-opt",
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is in the picture?"},
                                             {"type": "image_url", "image_url": {"url": image}}]},
            ],
            max_tokens=6,
            stream=True,
        )
    )  # fmt: skip
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == completion.choices[0].message.content
    assert len(pieces) >= min(2, len(completion.choices[0].message.content.split()))
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model="tiny-opt", messages=[{"role": "user", "content": "no image"}])
    assert "image_url" in str(caught.value)


def test_sigterm_drains_in_flight_requests(served, photos):
    """Runs last on this server: SIGTERM turns /ready to 503, refuses new work, finishes the work in flight."""
    process, url = served
    body = {"image": b64(photos[0]), "prompt": "a", "max_new_tokens": 60, "min_new_tokens": 60}
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.post, "/generate", json=body | {"prompt": f"a {i}"}) for i in range(3)]
        # All three are in: one computing (batches of one), two queued.
        wait_for(
            lambda: metric(client.get("/metrics").text, "blip2_queue_depth") >= 2, "requests did not queue"
        )
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: client.get("/ready").status_code == 503, "/ready did not turn 503")
        refused = client.post("/caption", json={"image": b64(photos[1])})
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert client.get("/health").status_code == 200  # alive while draining
        finished = [f.result() for f in futures]
    assert [r.status_code for r in finished] == [200, 200, 200]
    assert [r.json()["usage"]["completion_tokens"] for r in finished] == [60, 60, 60]
    assert process.wait(timeout=120) == 0
