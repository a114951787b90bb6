"""`mlx-mistral service`: run the server in the background from login, as Mac apps expect.

On macOS a per-user LaunchAgent (`~/Library/LaunchAgents`, logs in `~/Library/Logs/mlx-mistral`),
on Linux a systemd user unit (`~/.config/systemd/user`, logs in the journal). Either runs
`python -m mlx_mistral.server` with the interpreter that installed it (so the right environment
is used without a shell's PATH) and the `serve` flags given, and restarts it when it crashes but
not when it was stopped on purpose. An API key is never written into the file: it must come from
`--api-key-file`, which the service reads at each start.
"""

from __future__ import annotations

import json
import os
import plistlib
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequestError

LABEL = "local.mlx-mistral.server"
UNIT = "mlx-mistral.service"
MANAGERS = ("launchd", "systemd")


def default_manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


@dataclass(frozen=True)
class ServiceFiles:
    """Where the service's definition and logs go, under a user's home."""

    home: Path
    manager: str

    @property
    def definition(self) -> Path:
        if self.manager == "launchd":
            return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        return self.home / ".config" / "systemd" / "user" / UNIT

    @property
    def log_dir(self) -> Path:
        return self.home / "Library" / "Logs" / "mlx-mistral"


# Flags whose value may be a path: a service starts in `/`, so relative paths are made absolute.
PATH_FLAGS = ("--model", "--api-key-file", "--warm-prompt", "--prompt-cache-dir")


def absolute_paths(serve_args: list[str]) -> list[str]:
    """`serve_args` with each existing relative (or `~`) path of PATH_FLAGS made absolute; a repo
    id such as `mistralai/Mistral-7B-Instruct-v0.2` is no local path and stays as it is."""
    out = list(serve_args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag not in PATH_FLAGS:
            continue
        if eq:
            path = Path(value).expanduser()
            out[i] = f"{flag}={path.resolve()}" if path.exists() else arg
        elif i + 1 < len(out) and Path(out[i + 1]).expanduser().exists():
            out[i + 1] = str(Path(out[i + 1]).expanduser().resolve())
    return out


def server_command(serve_args: list[str]) -> list[str]:
    """The command the service runs.

    Raises:
        InvalidRequestError: `--api-key` given (it would be written into a file others can list).
    """
    if any(arg == "--api-key" or arg.startswith("--api-key=") for arg in serve_args):
        raise InvalidRequestError(
            "a service must not hold the key in its definition: write it to a file "
            "(chmod 600) and give --api-key-file PATH",
            param="--api-key",
        )
    return [sys.executable, "-m", "mlx_mistral.server", *absolute_paths(serve_args)]


def launch_agent(command: list[str], files: ServiceFiles) -> dict:
    """The LaunchAgent's property list (what `plistlib.dump` writes)."""
    return {
        "Label": LABEL,
        "ProgramArguments": command,
        "RunAtLoad": True,  # at login
        "KeepAlive": {"SuccessfulExit": False},  # restarted after a crash, not after a stop
        "ThrottleInterval": 10,  # a server that keeps failing is retried every 10 s, no faster
        "ProcessType": "Interactive",  # not throttled as a background job: it serves the user
        "StandardOutPath": str(files.log_dir / "server.log"),
        "StandardErrorPath": str(files.log_dir / "server.log"),
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
    }


def systemd_unit(command: list[str]) -> str:
    """The systemd user unit's text."""
    return "\n".join(
        [
            "[Unit]",
            "Description=mlx-mistral: Mistral-7B-Instruct-v0.2 behind an OpenAI-compatible API",
            "After=network.target",
            "",
            "[Service]",
            "Type=exec",
            f"ExecStart={shlex.join(command)}",
            "Environment=PYTHONUNBUFFERED=1",
            "Restart=on-failure",  # a crash restarts it; `systemctl --user stop` does not
            "RestartSec=10",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _manager_commands(files: ServiceFiles, action: str) -> list[list[str]]:
    """The launchctl / systemctl commands that load (`start`) or unload (`stop`) the service."""
    if files.manager == "launchd":
        domain = f"gui/{os.getuid()}"
        if action == "start":
            return [["launchctl", "bootstrap", domain, str(files.definition)]]
        return [["launchctl", "bootout", f"{domain}/{LABEL}"]]
    if action == "start":
        return [
            ["systemctl", "--user", "daemon-reload"],
            ["systemctl", "--user", "enable", "--now", UNIT],
        ]
    return [["systemctl", "--user", "disable", "--now", UNIT]]


def install(serve_args: list[str], files: ServiceFiles, *, start: bool = True) -> list[str]:
    """Write the service definition (0644, no secret in it) and, with `start`, load it.

    Returns the lines to print.
    """
    command = server_command(serve_args)
    files.definition.parent.mkdir(parents=True, exist_ok=True)
    if files.manager == "launchd":
        files.log_dir.mkdir(parents=True, exist_ok=True)
        text = plistlib.dumps(launch_agent(command, files))
    else:
        text = systemd_unit(command).encode()
    partial = files.definition.with_name(files.definition.name + ".partial")
    partial.write_bytes(text)
    partial.replace(files.definition)  # never a half-written definition
    lines = [f"wrote {files.definition}"]
    if start:
        lines += _apply(files, "start")
    return lines


def uninstall(files: ServiceFiles) -> list[str]:
    """Stop the service and remove its definition. Returns the lines to print."""
    if not files.definition.exists():
        return [f"no service installed ({files.definition} does not exist)"]
    lines = _apply(files, "stop")
    files.definition.unlink()
    return [*lines, f"removed {files.definition}"]


def _apply(files: ServiceFiles, action: str) -> list[str]:
    lines = []
    for command in _manager_commands(files, action):
        try:
            done = _run(command)
        except FileNotFoundError:
            return [f"{command[0]} is not on this machine: run the service yourself"]
        detail = (done.stderr or done.stdout).strip().splitlines()
        note = f": {detail[-1]}" if done.returncode and detail else ""
        lines.append(f"{shlex.join(command)}: {'ok' if done.returncode == 0 else 'failed'}{note}")
    return lines


def loaded(files: ServiceFiles) -> bool | None:
    """Whether the service manager runs the service (None: the manager is not here)."""
    if files.manager == "launchd":
        command = ["launchctl", "print", f"gui/{os.getuid()}/{LABEL}"]
    else:
        command = ["systemctl", "--user", "is-active", "--quiet", UNIT]
    try:
        return _run(command).returncode == 0
    except FileNotFoundError:
        return None


def served_url(files: ServiceFiles) -> str:
    """The base URL the installed service listens on, from its own flags."""
    if files.manager == "launchd":
        command = plistlib.loads(files.definition.read_bytes())["ProgramArguments"]
    else:
        line = next(
            ln for ln in files.definition.read_text().splitlines() if ln.startswith("ExecStart=")
        )
        command = shlex.split(line.removeprefix("ExecStart="))
    host, port = "127.0.0.1", "8000"
    for flag, value in zip(command, command[1:]):
        if flag == "--host":
            host = value
        elif flag == "--port":
            port = value
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def health(url: str) -> str:
    """What `GET /health` says at `url`, in a few words."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
            body = json.loads(answer.read() or b"{}")
            return f"answers /health: {body.get('status', '?')}"
    except urllib.error.HTTPError as exc:
        return f"answers /health with HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"does not answer /health ({getattr(exc, 'reason', exc)})"


def status(files: ServiceFiles) -> tuple[int, list[str]]:
    """(exit status, lines): 0 when the server answers /health, 3 when it is installed but does
    not answer (the `systemctl status` convention for "not running"), 4 when not installed."""
    if not files.definition.exists():
        return 4, [f"not installed ({files.definition} does not exist)"]
    is_loaded = loaded(files)
    url = served_url(files)
    said = health(url)
    manager_says = {True: "loaded", False: "not loaded", None: f"{files.manager} is not here"}
    return (0 if said.startswith("answers /health: ok") else 3), [
        f"installed: {files.definition}",
        f"{files.manager}: {manager_says[is_loaded]}",
        f"{url} {said}",
    ]
