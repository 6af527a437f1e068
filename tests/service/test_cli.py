"""`sd-engine serve` refuses what it cannot serve in one line, before loading anything."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "engine.cli", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_port_in_use_is_one_line(tiny_engine: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(serve(str(tiny_engine), "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line


@pytest.mark.parametrize(
    ("folder", "expected"),
    [("missing", "does not exist"), ("empty", "not an engine folder")],
)
def test_folders_that_are_not_engines_are_one_line(tmp_path: Path, folder: str, expected: str) -> None:
    path = tmp_path / folder
    if folder == "empty":
        path.mkdir()
    assert expected in one_error_line(serve(str(path)))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--api-auth", "nopassword"], "user:password"),
        (["--max-batch", "0"], "at least 1"),
        (["--drain-timeout", "-1"], ">= 0"),
        (["--port", "99999"], "0..65535"),
    ],
)
def test_bad_options_are_usage_errors(tiny_engine: Path, args: list[str], expected: str) -> None:
    result = serve(str(tiny_engine), *args)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["option", "variable"])
def test_an_empty_api_key_is_refused_not_an_open_server(tiny_engine: Path, how: str, monkeypatch) -> None:
    if how == "option":
        result = serve(str(tiny_engine), "--api-key", "")
    else:
        monkeypatch.setenv("SD_ENGINE_API_KEY", "")
        result = serve(str(tiny_engine))
    assert "empty" in one_error_line(result)
