"""docs/DEPLOY.md: the commands it gives are the ones these tests validate. Each command, in a code
block or inline, is read from the page and checked: compose lines render with the real Compose v2 and
the same flags, kubectl lines name kustomizations and objects that exist (secrets and namespaces are
created with --dry-run=client), curl lines call routes the server has, docker build lines build the
image names that compose and the manifests run, and the image-size measurement installs the pinned
torch and an existing extra from what the server image copies. The curl examples of the README and
docs/API.md call routes the server has."""

from __future__ import annotations

import fnmatch
import re
import shlex

import pytest
import tomllib
from _deploy import (
    DOCS,
    KUSTOMIZATIONS,
    README,
    REPO,
    compose_config,
    deployment_docs,
    image_config,
    render,
    run,
    serves,
    tool,
)

COMMANDS = ("docker", "kubectl", "helm", "curl", "make", "python", "export")


def _commands() -> list[str]:
    text = deployment_docs()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line:
                found.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        words = span.split()
        while words and re.fullmatch(r"[A-Z][A-Z0-9_]*=\S+", words[0]):
            words = words[1:]
        if len(words) > 2 and words[0] in COMMANDS:  # "docker stop" in a sentence is no command
            found.append(span)
    return found


def _split(command: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command)
    env = {}
    while re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


COMMAND_LINES = _commands()


def test_the_page_has_commands_for_every_deployment():
    joined = "\n".join(COMMAND_LINES)
    for needed in [
        "docker compose -f docker/compose.yaml up",
        "docker compose -f docker/compose.yaml --profile cpu up",
        "--profile monitoring",
        *(f"kubectl apply -k {k}" for k in KUSTOMIZATIONS),
        "docker build -f docker/Dockerfile",
        "docker build -f docker/Dockerfile --target train",
    ]:
        assert needed in joined, needed


def _parts(command: str) -> list[tuple[dict[str, str], list[str]]]:
    """A line as the commands it chains with `&&` or pipes with `|`."""
    env, words = _split(command)
    parts, current = [], []
    for word in words:
        if word in ("&&", "|"):
            parts.append(current)
            current = []
        else:
            current.append(word)
    parts.append(current)
    return [(env if i == 0 else {}, part) for i, part in enumerate(parts)]


@pytest.mark.parametrize("command", COMMAND_LINES)
def test_command_is_valid(command):
    for env, words in _parts(command):
        _check_command(command, env, words)


def _check_command(command: str, env: dict[str, str], words: list[str]) -> None:
    if words[:2] == ["docker", "compose"]:
        _check_compose(words[2:], env)
    elif words[:2] == ["docker", "build"]:
        _check_build(words[2:])
    elif words[:2] in (["docker", "tag"], ["docker", "push"]):
        _check_push(words[1], words[2:])
    elif words[0] == "kubectl":
        _check_kubectl(words[1:])
    elif words[0] == "curl":
        _check_curl(words[1:])
    elif words[:2] == ["helm", "install"]:
        values = words[words.index("-f") + 1]
        assert (REPO / values).is_file(), values
        assert "prometheus-adapter" in words[3]
    elif words[0] == "export":
        assert re.fullmatch(r"(HF_TOKEN|BLIP2_\w+)=.*", words[1]), words
    elif words[0] in ("make", "python"):
        assert command in ("make test", "python -m pytest tests/deploy -q"), command
    elif words[0].endswith("/bin/pip") or words[:3] == ["python3", "-m", "venv"]:
        _check_install(words)
    elif words[:2] == ["git", "archive"]:
        _check_archive(words[2:])
    elif words[0] in ("mkdir", "tar", "cd", "du"):
        _check_measurement_step(words)
    else:
        pytest.fail(f"no check for {command!r}: add one to tests/deploy/test_docs.py")


def _check_compose(args: list[str], env: dict[str, str]) -> None:
    subcommands = {"up", "down", "logs", "ps", "build", "pull", "config", "restart", "stop"}
    at = next(i for i, word in enumerate(args) if word in subcommands)
    global_args, subcommand = args[:at], args[at]
    assert global_args[:2] == ["-f", "docker/compose.yaml"], "run from the repository root"
    rendered = compose_config(*global_args, env=env)["services"]
    services = set(rendered)
    assert services, f"{args}: no service selected"
    for key, value in env.items():
        if key.startswith("BLIP2_"):
            assert any(s.get("environment", {}).get(key) == value for s in rendered.values()), key
    assert services & {"blip2", "blip2-cpu"}, "a server service runs"
    if subcommand == "up":
        assert {"-d"} <= set(args[at + 1 :])


def _check_build(args: list[str]) -> None:
    assert args[args.index("-f") + 1] == "docker/Dockerfile"
    assert args[-1] == ".", "the build context is the repository root"
    variant = "gpu"
    if "--build-arg" in args:
        key, _, variant = args[args.index("--build-arg") + 1].partition("=")
        assert key == "VARIANT" and variant in ("gpu", "cpu")
    suffix = ""
    if "--target" in args:
        target = args[args.index("--target") + 1]
        assert target == "train", "the server image is the default target"
        assert image_config(variant, target=target)["Chain"][-1] == target
        suffix = "-train"
    tag = args[args.index("-t") + 1]
    assert tag == f"blip2-stack:{variant}{suffix}", "the name compose and the manifests use"


BUILT_IMAGES = {"blip2-stack:gpu", "blip2-stack:cpu", "blip2-stack:gpu-train"}  # what the build lines tag


def _check_push(verb: str, args: list[str]) -> None:
    """An image built above, tagged into a registry under the same name, and pushed by that name."""
    pushed = args[-1]
    registry, _, name = pushed.rpartition("/")
    assert registry and name in BUILT_IMAGES, pushed
    if verb == "tag":
        assert args == [name, pushed], args


def test_images_are_pushed_before_the_cluster_runs_them():
    """Each Kubernetes path pushes its image and creates the namespace before its `kubectl apply`."""
    lines = COMMAND_LINES
    for apply, tag in [("kubectl apply -k k8s/base", "gpu"), ("kubectl apply -k k8s/overlays/cpu", "cpu")]:
        at = lines.index(apply)
        before = lines[:at]
        since = max(i for i, line in enumerate(before) if line.startswith("docker push")) if before else -1
        assert before[since].endswith(f"/blip2-stack:{tag}"), (apply, before[since])
        assert "kubectl create namespace blip2" in before[since:], f"{apply}: the namespace comes first"


def _check_install(words: list[str]) -> None:
    """The image-size measurement: a venv, the torch the project pins, then the project with an extra."""
    if words[0] == "python3":
        assert len(words) == 4 and words[3].startswith("/tmp/"), words
        return
    assert words[1] == "install", words
    pinned = set(re.findall(r"torch==([\d.]+)", (REPO / "Makefile").read_text()))
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for requirement in words[2:]:
        if requirement.startswith("torch"):
            assert requirement.removeprefix("torch==") in pinned, (requirement, pinned)
        else:
            named = re.fullmatch(r"\./?\[([\w,-]+)\]", requirement)
            assert named, f"{requirement}: the project, with an extra"
            assert set(named.group(1).split(",")) <= set(extras), requirement


def _check_archive(args: list[str]) -> None:
    """The measured tree is what the server image copies of the repository (the health check aside)."""
    paths = args[1:]
    copied = [c for c in image_config("cpu")["Copies"] if c != "docker/healthcheck.py"]
    for path in paths:
        assert any(fnmatch.fnmatch(path, c.rstrip("/")) for c in copied), (path, copied)
    for source in copied:
        assert any(fnmatch.fnmatch(p, source.rstrip("/")) for p in paths), (source, paths)


def _check_measurement_step(words: list[str]) -> None:
    if words[0] == "du":
        assert words[1] == "-sb" and words[2].endswith("/site-packages"), words
    else:
        assert all(w.startswith(("-", "/tmp/")) for w in words[1:]), words


def _objects() -> set[tuple[str, str]]:
    return {(doc["kind"].lower(), doc["metadata"]["name"]) for k in KUSTOMIZATIONS for doc in render(k)}


def _check_kubectl(args: list[str]) -> None:
    if args[:2] == ["-n", "blip2"]:
        args = args[2:]
    else:
        assert "-n" not in args, "the manifests use the namespace blip2"
    verb = args[0]
    if verb in ("apply", "delete") and args[1] == "-k":
        assert args[2] in KUSTOMIZATIONS, args[2]
    elif verb == "create":
        # Offline: what the cluster would receive.
        out = run([tool("kubectl"), "-n", "blip2", *args, "--dry-run=client", "-o", "yaml"]).stdout
        if args[1] == "secret":
            assert args[3] == "blip2-secrets"
            keys = {a.split("=", 1)[1].split("=")[0] for a in args if a.startswith("--from-literal=")}
            assert keys == {"HF_TOKEN", "BLIP2_API_KEY"}, "the keys the pods read"
        else:
            assert args[1:3] == ["namespace", "blip2"], out
    elif verb in ("logs", "rollout", "port-forward", "delete"):
        target = next(a for a in args[1:] if not a.startswith("-") and a != "status")
        kind, _, name = target.partition("/") if "/" in target else (args[1], "", args[2])
        kind = {"job": "job", "deployment": "deployment", "service": "service"}[kind]
        assert (kind, name) in _objects(), target
        if verb == "port-forward":
            ports = args[-1].split(":")
            service = next(d for d in render("k8s/base") if d["kind"] == "Service")
            assert int(ports[1]) == service["spec"]["ports"][0]["port"]
    elif verb == "get" and args[1] == "--raw":
        metric = args[2].rsplit("/", 1)[1]
        hpa = next(d for d in render("k8s/base") if d["kind"] == "HorizontalPodAutoscaler")
        assert metric == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        assert "/namespaces/blip2/" in args[2]
    else:
        pytest.fail(f"no check for kubectl {shlex.join(args)}")


def _check_curl(args: list[str]) -> None:
    url = next(a for a in args if "localhost:" in a)
    port, _, path = url.split("localhost:")[1].partition("/")
    assert port == "8000"
    method = "POST" if {"-F", "-d", "--data", "--form"} & set(args) else "GET"
    assert serves(method, "/" + path), f"{method} /{path}"


def _curl_calls(text: str) -> list[tuple[str, str, str]]:
    """Each curl line of a page's code blocks: (line, method, path)."""
    calls = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line.startswith("curl "):
                continue
            url = re.search(r"localhost:(\d+)(/[\w/.-]*)", line)
            assert url and url.group(1) == "8000", line
            method = "POST" if re.search(r"\s(-F|-d|--data|--form)\s", line) else "GET"
            calls.append((line, method, url.group(2)))
    return calls


CURL_PAGES = [README, DOCS / "API.md"]


@pytest.mark.parametrize("page", CURL_PAGES, ids=lambda page: page.name)
def test_curl_examples_call_routes_the_server_has(page):
    calls = _curl_calls(page.read_text())
    assert calls, f"{page.name} has curl examples"
    for line, method, path in calls:
        assert serves(method, path), f"{method} {path}: {line}"
