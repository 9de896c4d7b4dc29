"""The image cannot ship a command that does not start: run, outside any container, the exact entry point
and environment of docker/Dockerfile (plus what compose and the Kubernetes CPU overlay add), and get a
ready server; then check the container health probe, the metrics the autoscalers read, and the drain.

Only what exists solely inside the image is mapped to this machine: /opt/venv/bin (this venv's bin),
HF_HOME and HOME (temporary folders), the port (a free one, so parallel runs never collide), and the
model, which is a tiny checkpoint built here (the CPU image's packaged default model is not shipped yet).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from _deploy import DOCKER, K8S, compose_config, container, find, image_config, render

START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from training.assemble import preset

    out = tmp_path_factory.mktemp("tiny-opt")
    preset("tiny-opt").save(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deployment_env(where: str) -> dict[str, str]:
    """The variables a deployment adds on top of the image's (secrets left unset)."""
    if where == "image":
        return {}
    if where == "k8s-gpu":
        # The GPU ConfigMap's source file (configMapGenerator envs), read without kubectl.
        lines = (K8S / "base" / "server.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    if where == "compose":
        env = compose_config("-f", str(DOCKER / "compose.yaml"), "--profile", "cpu")["services"]["blip2-cpu"]
        return {k: str(v) for k, v in env["environment"].items() if v is not None}
    docs = render("k8s/overlays/cpu")
    c = container(find(docs, "Deployment", "blip2-server"))
    env = {}
    for source in c["envFrom"]:
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


def _entrypoint(where: str, tiny: Path, tmp: Path) -> tuple[list[str], dict[str, str]]:
    image = image_config("gpu" if where.endswith("-gpu") else "cpu")
    env = {**image["Env"], **_deployment_env(where)}
    here = str(Path(sys.executable).parent)
    env["PATH"] = env["PATH"].replace("/opt/venv/bin", here).replace("$PATH", os.environ.get("PATH", ""))
    assert env["HF_HOME"].startswith("/cache/")
    env["HF_HOME"], env["HOME"] = str(tmp / "hf"), str(tmp / "home")
    if env.get("BLIP2_GALLERY_DIR"):  # compose keeps the gallery on the /cache volume: here, a fresh folder
        assert env["BLIP2_GALLERY_DIR"].startswith("/cache/")
        env["BLIP2_GALLERY_DIR"] = str(tmp / "gallery")
    env["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub
    env["BLIP2_PORT"] = str(_free_port())
    env["BLIP2_MODEL"] = str(tiny / "generation")
    env["BLIP2_RETRIEVAL_MODEL"] = str(tiny / "stage1")
    return image["Entrypoint"] + image["Cmd"], env


def _get(port: int, path: str, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _wait_ready(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the entry point exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if _get(port, "/ready")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no 200 from /ready within {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def _autoscaler_metrics() -> set[str]:
    """The metric names the HPA, prometheus-adapter and KEDA read (from the source files: kustomize
    renames none of them, and the GPU machine has no kubectl)."""
    hpa = yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    keda = yaml.safe_load((K8S / "overlays" / "keda" / "scaledobject.yaml").read_text())
    query = keda["spec"]["triggers"][0]["metadata"]["query"]
    return {
        "blip2_queue_depth",
        hpa["spec"]["metrics"][0]["pods"]["metric"]["name"],
        adapter["rules"]["custom"][0]["seriesQuery"].split("{")[0],
        query.removeprefix("sum(").split("{")[0],
    }


def _png_data_uri() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


GPU_CASE = pytest.param(
    "k8s-gpu",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not _has_cuda(), reason="the GPU image's settings need a CUDA GPU"),
    ],
)


@pytest.mark.parametrize("where", ["image", "compose", "k8s", GPU_CASE])
def test_entry_point_serves_and_drains(where, tiny_checkpoint, tmp_path):
    """image / compose / k8s: the CPU image with what each deployment adds; k8s-gpu: the GPU image with
    the base's settings (cuda, float16, the LLM in 8-bit), on a machine with a GPU."""
    argv, env = _entrypoint(where, tiny_checkpoint, tmp_path)
    port = int(env["BLIP2_PORT"])
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        _wait_ready(process, port, log)
        assert _get(port, "/health")[0] == 200

        # The container health checks (image: /health, compose: /ready) pass with the shipped script...
        probe = [sys.executable, str(DOCKER / "healthcheck.py")]
        for path in ("/health", "/ready"):
            result = subprocess.run([*probe, path], env=env, capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, result.stderr
        # ...and fail where nothing answers.
        elsewhere = {**env, "BLIP2_PORT": str(_free_port())}
        assert (
            subprocess.run([*probe, "/health"], env=elsewhere, capture_output=True, timeout=30).returncode
            == 1
        )

        status, metrics = _get(port, "/metrics")
        assert status == 200
        exported = {line.split()[2] for line in metrics.splitlines() if line.startswith("# TYPE ")}
        assert _autoscaler_metrics() <= exported
        if where.endswith("-gpu"):  # the model really sits on the GPU
            held = [
                line for line in metrics.splitlines() if line.startswith("blip2_gpu_memory_allocated_bytes ")
            ]
            assert held and float(held[0].split()[1]) > 0, held

        status, models = _get(port, "/v1/models")
        assert status == 200 and json.loads(models)["data"]
        status, answer = _get(port, "/caption", {"image": _png_data_uri(), "max_new_tokens": 4})
        assert status == 200, answer
        assert isinstance(json.loads(answer)["caption"], str)

        # SIGTERM (docker stop, pod deletion): the server drains and exits cleanly in time.
        drain_s = float(env.get("BLIP2_DRAIN_TIMEOUT_S", 30))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=drain_s + 15) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
