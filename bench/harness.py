"""Start the processes a benchmark needs on 127.0.0.1 and stop them afterwards."""

import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing is listening on 127.0.0.1:{port} after {timeout} s")


def machine_summary() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


@contextmanager
def process(args: list[str], port: int, env: dict | None = None, stderr=None):
    """Run ``args`` until the block ends; ``stderr`` is a file, or None to drop it."""
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=stderr if stderr is not None else subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def fake_gemini(*extra: str):
    port = free_port()
    args = [sys.executable, "-m", "tests.fake_gemini", "--port", str(port), *extra]
    with process(args, port):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def redis_server():
    port = free_port()
    args = [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    with process(args, port):
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def restartable_redis():
    """Run a redis-server that the caller may stop and start again on its port."""
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Gateway:
    """A running daphne process of the gateway."""

    url: str
    process: subprocess.Popen
    # The environment the gateway's settings were read from.
    settings_env: dict[str, str]

    def manage(self, *command: str) -> str:
        """Run a manage.py command on the gateway's database; return its stdout."""
        completed = subprocess.run(
            [sys.executable, "manage.py", *command],
            cwd=ROOT,
            env={**os.environ, **self.settings_env},
            check=True,
            capture_output=True,
            text=True,
        )
        return completed.stdout


@contextmanager
def gateway(gemini_url: str, redis_url: str | None, **env: str):
    """Run daphne with the bench settings on a migrated, synced temporary SQLite."""
    with gateway_server(gemini_url, redis_url, **env) as server:
        yield server.url


@contextmanager
def gateway_server(
    gemini_url: str, redis_url: str | None, *, log_path: Path | None = None, **env: str
):
    """Run the gateway as ``gateway`` does and yield its Gateway.

    With ``log_path`` the daphne process's stderr, which carries the gateway's
    log, is appended to that file.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        settings_env = {
            "DJANGO_SETTINGS_MODULE": "bench.settings",
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "bench-only-secret",
            "DATABASE_URL": f"sqlite:///{folder}/bench.sqlite3",
            "GEMINI_API_KEY": "bench-key",
            "GEMINI_BASE_URL": gemini_url,
            "GATEWAY_AUTH": "off",
            "LOG_LEVEL": "warning",
            **({"REDIS_URL": redis_url} if redis_url else {}),
            **env,
        }
        for command in (["migrate", "--noinput"], ["sync_prompts"]):
            subprocess.run(
                [sys.executable, "manage.py", *command],
                cwd=ROOT,
                env={**os.environ, **settings_env},
                check=True,
                stdout=subprocess.DEVNULL,
            )
        args = [
            str(BIN / "daphne"),
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "gateway_project.asgi:application",
        ]
        with open(log_path or os.devnull, "ab") as log:
            with process(args, port, settings_env, stderr=log) as proc:
                yield Gateway(f"http://127.0.0.1:{port}", proc, settings_env)
