"""`blip2-serve`'s commands: each `--help` lists that command's own settings (the server every Settings
field; `gallery add` / `gallery reindex` only those an offline run reads) and every flag listed works."""

from __future__ import annotations

import re

import pytest

from service.__main__ import main
from service.cli import parse_command
from service.settings import Settings

SERVER_ONLY = ["--port", "--host", "--decoder", "--api-key", "--max-batch-size", "--quantization", "--warmup"]


def _help(capsys, argv: list[str]) -> set[str]:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", capsys.readouterr().out))


def test_the_server_takes_every_setting(capsys):
    flags = _help(capsys, [])
    assert {"--" + name.replace("_", "-") for name in Settings.model_fields} <= flags


@pytest.mark.parametrize("command", ["add", "reindex"])
def test_gallery_commands_list_their_own_settings_only(capsys, command):
    flags = _help(capsys, ["gallery", command])
    assert {"--gallery-dir", "--gallery-uri", "--retrieval-model", "--batch-size", "--no-progress"} <= flags
    assert not flags & set(SERVER_ONLY), sorted(flags & set(SERVER_ONLY))


def test_a_server_flag_is_refused_by_the_gallery_command(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["gallery", "add", str(tmp_path), "--gallery-dir", str(tmp_path / "g"), "--port", "9000"])
    assert exit_.value.code == 2 and "unrecognized arguments: --port 9000" in capsys.readouterr().err


def test_serve_is_the_default_command(capsys):
    assert _help(capsys, ["serve"]) >= {"--" + name.replace("_", "-") for name in Settings.model_fields}
    argv = ["--model", "m", "--port", "9000", "--no-warmup"]
    assert (
        parse_command(argv)
        == parse_command(["serve", *argv])
        == (
            "serve",
            {"model": "m", "port": "9000", "warmup": False},
        )
    )


def test_a_server_flag_before_the_gallery_command_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["--port", "9000", "gallery", "add", str(tmp_path), "--gallery-dir", str(tmp_path / "g")])
    assert exit_.value.code == 2 and "--port: server flags" in capsys.readouterr().err
    command, args = parse_command(["gallery", "reindex", "--gallery-dir", "g", "--model", "m"])
    assert command == "gallery reindex" and args["gallery_dir"] == "g" and args["model"] == "m"
