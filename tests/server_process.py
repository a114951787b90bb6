"""Run a real `python -m mlx_mistral.server` process for tests (port chosen by the OS)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

_LISTENING = re.compile(r"serving .+ on http://(\S+?):(\d+)/v1")


class ServerProcess:
    """A server subprocess on a free port; use as a context manager.

    Args:
        model: the checkpoint directory to serve (None: no --model, the server picks one).
        args: more `serve` flags.
        timeout: seconds to wait for /health to answer 200.
        env: environment changes for the process (a None value removes the variable).

    Example:
        >>> with ServerProcess(ckpt, "--api-key", "k") as server:
        ...     httpx.get(server.url("/health"))
    """

    def __init__(
        self,
        model: str | Path | None,
        *args: str,
        timeout: float = 60.0,
        env: dict[str, str | None] | None = None,
    ):
        model_args = [] if model is None else ["--model", str(model)]
        # No disk prompt cache unless a test asks for one: tests never write to the user's cache.
        cache_args = [] if "--prompt-cache-dir" in args else ["--prompt-cache-dir", "off"]
        serve = [sys.executable, "-m", "mlx_mistral.server", *model_args, "--port", "0"]
        self.argv = [*serve, *cache_args, *args]
        self.timeout = timeout
        self.env_changes = env or {}
        self.port: int | None = None
        fd, self._log_path = tempfile.mkstemp(prefix="mlx-mistral-server-", suffix=".log")
        self._log = os.fdopen(fd, "w+")
        self.proc: subprocess.Popen | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MLX_MISTRAL_API_KEY", None)
        for name, value in self.env_changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        # The server runs at a lower CPU priority than the test: on a 2-core machine its engine
        # keeps both cores busy, and a test client waiting for a core (to close a stream, say)
        # would otherwise let the server run on for hundreds of tokens. (`nice` execs the
        # server, so `proc.pid` is the server's.)
        self.proc = subprocess.Popen(
            ["nice", "-n", "10", *self.argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            match = _LISTENING.search(self.log())
            if match and self._healthy(int(match.group(2))):
                self.port = int(match.group(2))
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {self.timeout}s:\n{self.log()}")

    def _healthy(self, port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, and return the exit status (SIGKILL if it hangs)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> ServerProcess:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log_path)

    # -- helpers -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        with open(self._log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
