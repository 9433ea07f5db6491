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
from pathlib import Path

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
def process(args: list[str], port: int, env: dict | None = None):
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
def gateway(gemini_url: str, redis_url: str | None, **env: str):
    """Run daphne with the bench settings on a migrated, synced temporary SQLite."""
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
        with process(args, port, settings_env):
            yield f"http://127.0.0.1:{port}"
