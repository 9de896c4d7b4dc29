"""docker/compose.yaml: valid against the Compose specification, rendered by the real Compose v2 for each
profile, and consistent with .env, the image and the server's routes and settings."""

from __future__ import annotations

import re

import pytest
import yaml
from _deploy import (
    COMPOSE_FILE,
    DOCKER,
    blip2_env_keys,
    compose_config,
    image_config,
    run,
    serves,
    settings_fields,
    settings_from_env,
    tool,
)

FILE = ["-f", str(COMPOSE_FILE)]


def _dotenv() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / ".env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_compose_file_validates_against_the_compose_spec():
    run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])


@pytest.mark.parametrize(
    ("args", "env", "services"),
    [
        ([], {}, {"blip2"}),  # COMPOSE_PROFILES=gpu from .env
        (["--profile", "cpu"], {}, {"blip2-cpu"}),
        ([], {"COMPOSE_PROFILES": "cpu"}, {"blip2-cpu"}),
        (["--profile", "gpu", "--profile", "monitoring"], {}, {"blip2", "prometheus"}),
        (["--profile", "cpu", "--profile", "monitoring"], {}, {"blip2-cpu", "prometheus"}),
    ],
)
def test_profiles_select_the_services(args, env, services):
    assert set(compose_config(*FILE, *args, env=env)["services"]) == services


def _service(name: str) -> dict:
    profile = {"blip2": "gpu", "blip2-cpu": "cpu", "prometheus": "monitoring"}[name]
    return compose_config(*FILE, "--profile", profile)["services"][name]


@pytest.mark.parametrize("name", ["blip2", "blip2-cpu"])
def test_server_service_matches_image_and_routes(name):
    service = _service(name)
    variant = "gpu" if name == "blip2" else "cpu"
    assert service["image"] == f"blip2-stack:{variant}"
    assert service["build"]["args"] == {"VARIANT": variant}
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert service["restart"] == "unless-stopped"
    assert service["init"] is True
    (port,) = service["ports"]
    assert port["target"] == 8000 and str(port["published"]) == _dotenv()["BLIP2_PUBLISHED_PORT"]
    image = image_config(variant)
    assert image["ExposedPorts"] == [str(port["target"])]
    # The healthcheck runs the script the image ships, on the readiness route.
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/opt/blip2/healthcheck.py"]
    assert test[3] == "/ready" and serves("GET", "/ready")
    # The Hugging Face cache (HF_HOME in the image) lives on the named volume.
    (volume,) = service["volumes"]
    assert volume["type"] == "volume" and volume["source"] == "hf-cache"
    assert image["Env"]["HF_HOME"].startswith(volume["target"] + "/")


@pytest.mark.parametrize("name", ["blip2", "blip2-cpu"])
def test_settings_are_ones_the_server_accepts(name):
    environment = _service(name)["environment"]
    assert blip2_env_keys(environment) <= settings_fields(), blip2_env_keys(environment) - settings_fields()
    settings = settings_from_env(environment)
    if name == "blip2":
        assert settings.model == "Salesforce/blip2-opt-2.7b"
        assert settings.load_in_8bit is True and settings.load_in_4bit is False
        assert settings.device == "cuda"
    else:
        assert "BLIP2_MODEL" not in environment, "the CPU image serves its packaged default model"
        assert settings.device == "cpu"
    # Secrets pass through from the shell only: unset unless the operator sets them.
    assert environment["BLIP2_API_KEY"] is None and environment["HF_TOKEN"] is None
    stop = _service(name)["stop_grace_period"]
    seconds = int(re.fullmatch(r"(\d+)s", stop).group(1))
    assert seconds > settings.drain_timeout_s + 5, "docker stop must outlast the drain"


def test_gpu_is_reserved_the_compose_way():
    devices = _service("blip2")["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in _service("blip2-cpu")


def test_dotenv_documents_every_setting_the_compose_file_reads():
    dotenv = _dotenv()
    text = COMPOSE_FILE.read_text()
    read = set(re.findall(r"\$\{(\w+)(?::-[^}]*)?\}", text))
    assert read <= set(dotenv), read - set(dotenv)
    lines = (DOCKER / ".env").read_text().splitlines()
    for key in dotenv:
        at = next(i for i, line in enumerate(lines) if line.startswith(key + "="))
        while at > 0 and re.match(r"\w+=", lines[at - 1]):
            at -= 1  # a group of settings under one comment
        assert lines[at - 1].startswith("#"), f"{key} needs a comment that documents it"
    assert dotenv["COMPOSE_PROFILES"] == "gpu"
    assert dotenv["BLIP2_MODEL"] == "Salesforce/blip2-opt-2.7b" and dotenv["BLIP2_LOAD_IN_8BIT"] == "true"
    assert (
        blip2_env_keys({k: v for k, v in dotenv.items() if k != "BLIP2_PUBLISHED_PORT"}) <= settings_fields()
    )


def test_compose_defaults_equal_the_dotenv_defaults():
    """Without .env (or with a value removed from it) the services run with the same settings."""
    with_dotenv = compose_config(*FILE, "--profile", "gpu")["services"]["blip2"]
    without = compose_config(*FILE, "--env-file", "/dev/null", "--profile", "gpu")["services"]["blip2"]
    assert with_dotenv["environment"] == without["environment"]
    assert with_dotenv["ports"] == without["ports"]


def test_shell_variables_override_dotenv():
    service = compose_config(*FILE, env={"BLIP2_MODEL": "Salesforce/blip2-flan-t5-xl"})["services"]["blip2"]
    assert service["environment"]["BLIP2_MODEL"] == "Salesforce/blip2-flan-t5-xl"


def test_prometheus_scrapes_the_metrics_route():
    service = _service("prometheus")
    mounts = {v["target"]: v for v in service["volumes"]}
    config_mount = mounts["/etc/prometheus/prometheus.yml"]
    assert config_mount["read_only"] is True
    assert config_mount["source"] == str(DOCKER / "prometheus.yml")
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert serves("GET", job["metrics_path"])
    (target,) = job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    assert int(port) == 8000
    # Whichever server runs answers to that name: the GPU service by name, the CPU one by alias.
    assert host == "blip2"
    assert host in _service("blip2-cpu")["networks"]["default"]["aliases"]
