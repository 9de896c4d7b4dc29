"""docker/Dockerfile: lint-clean (hadolint), and each variant's image has the user, port, health check,
entry point and settings that the rest of the deployment relies on. The server image holds the serving
extra and no training code; the training image (`--target train`) the training extra and no server."""

from __future__ import annotations

import re

import pytest
import tomllib
from _deploy import (
    DOCKER,
    DOCKERFILE,
    REPO,
    blip2_env_keys,
    image_config,
    run,
    serves,
    settings_fields,
    settings_from_env,
    tool,
)

VARIANTS = ["gpu", "cpu"]


def test_hadolint_finds_nothing():
    run([tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)])


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_bases_and_torch_build(variant):
    image = image_config(variant)
    assert image["Chain"] == [f"base-{variant}", "common", "runtime"]
    if variant == "gpu":
        assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", image["Base"]), image["Base"]
        assert re.search(r"/whl/cu\d+$", image["Env"]["TORCH_INDEX_URL"])
        cuda = image["Base"].split(":")[1].split(".")[:2]
        assert image["Env"]["TORCH_INDEX_URL"].endswith("cu" + "".join(cuda)), (
            "torch's CUDA = the base's CUDA"
        )
    else:
        assert image["Base"].startswith("python:3.")
        assert image["Env"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert any(
        'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in r for r in image["Runs"]
    )
    assert any(re.match(r'pip install "\./\[', r) for r in image["Runs"]), (
        "the project installs from pyproject.toml"
    )


def _project_installs(image: dict) -> list[str]:
    """The extras each `pip install` of the project names: `pip install "./[serve]"` -> "serve"."""
    installs = [r for r in image["Runs"] if re.match(r'pip install "?\.', r)]
    return [re.match(r'pip install "?\./?(?:\[([\w,-]*)\])?"?(?:\s|$)', r).group(1) or "" for r in installs]


@pytest.mark.parametrize("variant", VARIANTS)
def test_server_image_installs_the_serve_extra_and_no_training_code(variant):
    image = image_config(variant)
    assert _project_installs(image) == ["serve"], image["Runs"]
    copied = [source.rstrip("/") for source in image["Copies"]]
    assert "service" in copied and "blip2" in copied  # the core package the server imports
    assert not any(source.split("/")[0] in ("training", "recipes", ".") for source in copied), copied
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    serving = {re.split(r"[<>=\[ ;]", requirement)[0].lower() for requirement in extras["serve"]}
    assert not serving & {"pycocoevalcap", "peft", "webdataset"}, "training-only packages"


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_image_installs_the_train_extra_and_no_server(variant):
    image = image_config(variant, target="train")
    assert image["Chain"] == [f"base-{variant}", "common", "train"]
    assert _project_installs(image) == ["train"], image["Runs"]
    copied = [source.rstrip("/") for source in image["Copies"]]
    assert "training" in copied and "blip2" in copied and "service" not in copied, copied
    assert image["User"] == image_config(variant)["User"], "the same non-root uid as the server"


def test_torch_version_is_the_one_the_project_pins():
    _, global_args = __import__("_deploy").dockerfile_stages("cpu")
    makefile = (REPO / "Makefile").read_text()
    pinned = set(re.findall(r"torch==([\d.]+)", makefile))
    assert pinned == {global_args["TORCH_VERSION"]}, (pinned, global_args["TORCH_VERSION"])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_range = next(d for d in project["dependencies"] if d.startswith("torch"))
    from packaging.specifiers import SpecifierSet

    assert global_args["TORCH_VERSION"] in SpecifierSet(torch_range.removeprefix("torch"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_as_a_fixed_non_root_uid(variant):
    user = image_config(variant)["User"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, "numeric uid, so that runAsNonRoot can verify it"
    assert gid.isdigit()
    assert f"--uid {uid}" in DOCKERFILE.read_text()


@pytest.mark.parametrize("variant", VARIANTS)
def test_entry_point_is_the_blip2_serve_console_script(variant):
    image = image_config(variant)
    assert image["Entrypoint"] == ["blip2-serve"]
    assert image["Cmd"] == []
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["blip2-serve"] == "service.__main__:main"


@pytest.mark.parametrize("variant", VARIANTS)
def test_port_and_settings_match_the_server(variant):
    image = image_config(variant)
    env = image["Env"]
    assert image["ExposedPorts"] == [env["BLIP2_PORT"]] == ["8000"]
    assert blip2_env_keys(env) <= settings_fields()
    settings = settings_from_env(env)
    assert settings.port == 8000 and settings.host == "0.0.0.0"
    assert settings.device == ("cuda" if variant == "gpu" else "cpu")
    assert "BLIP2_MODEL" not in env, "the model is chosen at run time (CPU: the packaged default)"


@pytest.mark.parametrize("variant", VARIANTS)
def test_healthcheck_probes_liveness_with_the_shipped_script(variant):
    image = image_config(variant)
    check = image["Healthcheck"]
    assert "--start-period=" in check, "model loading needs a start period"
    command = re.search(r"CMD (\[.*\])", check).group(1)
    argv = __import__("json").loads(command)
    assert argv[:2] == ["python", "/opt/blip2/healthcheck.py"]
    assert argv[2] == "/health" and serves("GET", "/health")
    assert "COPY docker/healthcheck.py /opt/blip2/healthcheck.py" in DOCKERFILE.read_text()


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_cache_is_a_volume(variant):
    image = image_config(variant)
    assert image["Volumes"] == ["/cache"]
    assert image["Env"]["HF_HOME"].startswith("/cache/")


def test_build_context_ignore_file_keeps_what_copy_needs():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("**") :][:1] == ["**"], "everything is excluded first"
    copied = set(re.findall(r"^COPY (?!--)(.+?) \S+$", DOCKERFILE.read_text(), flags=re.M))
    sources = {src for line in copied for src in line.split()}
    for source in sources:
        source = source.rstrip("*").rstrip("/")
        assert any(line.lstrip("!").rstrip("*/") == source for line in ignore if line.startswith("!")), source


def _first_party_imports(package: str) -> set[str]:
    """The repository's own top-level packages that `package`'s modules import."""
    import ast

    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            found |= {name.split(".")[0] for name in names} & {"blip2", "service", "training"}
    return found


@pytest.mark.parametrize(("target", "package"), [(None, "service"), ("train", "training")])
def test_each_image_holds_the_packages_its_code_imports(target, package):
    """The server imports the core package (blip2/) as training does: an image without it fails at start."""
    image = image_config("cpu", **({"target": target} if target else {}))
    copied = {source.rstrip("/").split("/")[0] for source in image["Copies"]}
    assert _first_party_imports(package) <= copied, (package, copied)
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert all(f"!{name}/" in ignore for name in _first_party_imports(package)), (
        "the build context keeps them"
    )
