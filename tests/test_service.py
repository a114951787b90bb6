"""`mlx-mistral service install|uninstall|status`: the LaunchAgent and the systemd user unit.

The files are written under a temporary HOME by the real command; nothing is loaded into this
machine's service manager (`--no-start`).
"""

from __future__ import annotations

import configparser
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_mistral.demo import demo_model_path
from mlx_mistral.service import LABEL, UNIT
from tests.server_process import ServerProcess


def service(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_mistral.cli", "service", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(home)},
        cwd=home,
    )


def unit_file(home: Path) -> Path:
    return home / ".config" / "systemd" / "user" / UNIT


def plist_file(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def test_the_launch_agent_has_what_launchd_needs(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    done = service(
        tmp_path,
        "install",
        "--manager",
        "launchd",
        "--no-start",
        "--",
        "--port",
        "8123",
        "--api-key-file",
        "key",  # relative: the service starts in /, so it must be written absolute
    )
    assert done.returncode == 0, done.stderr
    with plist_file(tmp_path).open("rb") as file:
        agent = plistlib.load(file)
    assert agent["Label"] == LABEL
    assert agent["ProgramArguments"] == [
        sys.executable,
        "-m",
        "mlx_mistral.server",
        "--port",
        "8123",
        "--api-key-file",
        str(key_file),
    ]
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}  # restarted after a crash only
    logs = tmp_path / "Library" / "Logs" / "mlx-mistral"
    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == str(logs / "server.log")
    assert logs.is_dir()
    assert "s3cret" not in plist_file(tmp_path).read_text()


def test_the_systemd_unit_restarts_on_failure_and_starts_at_login(tmp_path):
    done = service(tmp_path, "install", "--manager", "systemd", "--no-start", "--", "--port", "9")
    assert done.returncode == 0, done.stderr
    unit = configparser.ConfigParser(interpolation=None)
    unit.read(unit_file(tmp_path))
    assert shlex.split(unit["Service"]["ExecStart"]) == [
        sys.executable,
        "-m",
        "mlx_mistral.server",
        "--port",
        "9",
    ]
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "default.target"
    if shutil.which("systemd-analyze"):
        verified = subprocess.run(
            ["systemd-analyze", "verify", str(unit_file(tmp_path))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verified.returncode == 0, verified.stderr


@pytest.mark.parametrize("key_flag", [["--api-key", "k"], ["--api-key=k"]])
def test_a_key_is_never_written_into_the_service(tmp_path, key_flag):
    done = service(tmp_path, "install", "--no-start", "--", *key_flag)
    assert done.returncode == 1
    assert "--api-key-file" in done.stderr and "Traceback" not in done.stderr
    assert not unit_file(tmp_path).exists() and not plist_file(tmp_path).exists()


def test_serve_flags_are_checked_at_install(tmp_path):
    done = service(tmp_path, "install", "--no-start", "--", "--max-batch", "many")
    assert done.returncode == 2
    assert "--max-batch" in done.stderr
    assert not unit_file(tmp_path).exists()


def test_status_says_not_installed(tmp_path):
    done = service(tmp_path, "status", "--manager", "systemd")
    assert done.returncode == 4
    assert done.stdout.startswith("not installed")


def test_status_reports_a_server_that_answers_and_one_that_does_not(tmp_path):
    with ServerProcess(demo_model_path()) as server:
        assert (
            service(
                tmp_path,
                "install",
                "--no-start",
                "--manager",
                "systemd",
                "--",
                "--port",
                str(server.port),
            ).returncode
            == 0
        )
        up = service(tmp_path, "status", "--manager", "systemd")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{server.port} answers /health: ok" in up.stdout
    down = service(tmp_path, "status", "--manager", "systemd")
    assert down.returncode == 3
    assert "does not answer /health" in down.stdout


def test_uninstall_removes_the_definition(tmp_path):
    service(tmp_path, "install", "--no-start", "--manager", "launchd")
    done = service(tmp_path, "uninstall", "--manager", "launchd")
    assert done.returncode == 0
    assert not plist_file(tmp_path).exists()
    assert "removed" in done.stdout
