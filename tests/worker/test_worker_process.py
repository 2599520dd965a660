"""`drawbridge worker` and `serve --with-worker` as processes: they sweep, and SIGTERM stops them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def start(args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path}/w.db",
        "DRAWBRIDGE_SWEEP_INTERVAL": "0.2",
        "DRAWBRIDGE_LOG_FORMAT": "text",
    }
    subprocess.run(
        [sys.executable, "-m", "app.cli", "db", "upgrade"], env=env, check=True, capture_output=True
    )
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    return output


def wait_for(text: str, process: subprocess.Popen[str], seen: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError("".join(seen))


def test_the_worker_says_it_simulates_sweeps_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = start(["worker", "--simulate"], tmp_path)
    seen: list[str] = []
    wait_for("worker sweeping every 0.2s", process, seen)
    output = "".join(seen) + stop(process)
    assert process.returncode == 0, output
    assert "SIMULATED HEROKU" in output and "no real access" in output
    assert "worker stopped" in output


def test_a_worker_without_heroku_credentials_refuses_to_start(tmp_path: Path) -> None:
    process = start(["worker"], tmp_path)
    output, _ = process.communicate(timeout=20)
    assert process.returncode != 0
    assert "HEROKU_API_TOKEN" in output


def test_serve_with_worker_answers_http_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = start(["serve", "--with-worker", "--simulate", "--port", "0"], tmp_path)
    seen: list[str] = []
    wait_for("Serving on http://", process, seen)
    url = seen[-1].split("Serving on ")[1].strip()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert httpx.get(f"{url}/healthz", timeout=2).json() == {"status": "ok"}
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
    output = "".join(seen) + stop(process)
    assert process.returncode == 0, output
    assert "worker stopped" in output
