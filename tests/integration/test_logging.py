"""Logs: one JSON line per event carrying the request id, which Heroku also receives as `Request-Id`; each
worker sweep has an id of its own; tokens and Heroku credentials never reach a log line."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import logs
from app.config import Config
from app.heroku.simulator import SimAddon, Simulator
from app.runtime import Runtime
from app.worker import Worker
from tests.conftest import SIM_TOKEN, TokenFactory

CapturedLog = Callable[[], list[dict[str, Any]]]


@contextmanager
def capture(fmt: str, secrets: tuple[str | None, ...] = ()) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logs.make_handler(fmt, stream=stream, secrets=secrets)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
def json_log() -> Iterator[CapturedLog]:
    with capture("json", (SIM_TOKEN,)) as stream:

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in stream.getvalue().splitlines()]

        yield lines


def register(client: FlaskClient, token_for: TokenFactory, addon: SimAddon, **headers: str) -> Any:
    return client.post(
        "/databases",
        json={"name": "main", "app": addon.app_name, "addon": addon.name},
        headers={**token_for("root", "admin"), **headers},
    )


def test_a_request_logs_json_lines_with_its_id_and_heroku_receives_the_same_id(
    client: FlaskClient,
    token_for: TokenFactory,
    addon: SimAddon,
    simulator: Simulator,
    json_log: CapturedLog,
) -> None:
    chosen = "trace-0f8e2c1a-inc-42"
    response = register(client, token_for, addon, **{"X-Request-Id": chosen})

    assert response.status_code == 201
    assert response.headers["X-Request-Id"] == chosen
    assert simulator.calls, "registering a database asks Heroku about it"
    assert {call.request_id for call in simulator.calls} == {chosen}

    lines = json_log()
    assert all({"timestamp", "level", "logger", "message", "request_id"} <= line.keys() for line in lines)
    mine = [line for line in lines if line["request_id"] == chosen]
    assert any(line["message"].startswith("heroku addon_lookup status=200") for line in mine)
    (access,) = [line for line in mine if line["logger"] == "app.api.instrumentation"]
    assert access["method"] == "POST" and access["route"] == "/databases" and access["status"] == 201
    assert access["level"] == "INFO" and access["duration_ms"] >= 0


@pytest.mark.parametrize("presented", [None, "short", "has spaces in it", "x" * 201, "semi;colon-0123456"])
def test_a_missing_or_insane_request_id_is_replaced_by_a_new_one(
    client: FlaskClient, presented: str | None
) -> None:
    headers = {"X-Request-Id": presented} if presented is not None else {}
    first = client.get("/healthz", headers=headers).headers["X-Request-Id"]
    second = client.get("/healthz", headers=headers).headers["X-Request-Id"]
    assert first != second
    assert uuid.UUID(first) and uuid.UUID(second)


def test_errors_carry_the_request_id_too(client: FlaskClient) -> None:
    response = client.get("/no-such-route", headers={"X-Request-Id": "abcdefgh-1234"})
    assert response.status_code == 404
    assert response.headers["X-Request-Id"] == "abcdefgh-1234"


def test_each_worker_sweep_has_its_own_request_id_in_logs_and_at_heroku(
    client: FlaskClient,
    runtime: Runtime,
    token_for: TokenFactory,
    addon: SimAddon,
    simulator: Simulator,
    json_log: CapturedLog,
) -> None:
    assert register(client, token_for, addon).status_code == 201
    created = client.post(
        "/access-requests",
        json={"database": "main", "cidr": "8.8.8.8", "duration": "1h", "reason": "INC-1"},
        headers=token_for("alice", "requester"),
    )
    request_id = created.get_json()["id"]
    approved = client.post(
        f"/access-requests/{request_id}/approve", json={}, headers=token_for("bob", "approver")
    )
    assert approved.status_code == 200
    web_ids = {call.request_id for call in simulator.calls}
    simulator.reset_calls()
    worker = Worker(runtime)

    worker.run_once()
    first_sweep = {call.request_id for call in simulator.calls}
    simulator.reset_calls()
    revoked = client.post(
        f"/access-requests/{request_id}/revoke", json={}, headers=token_for("root", "admin")
    )
    assert revoked.status_code == 200
    worker.run_once()
    second_sweep = {call.request_id for call in simulator.calls}

    assert len(first_sweep) == 1 and len(second_sweep) == 1
    (first,) = first_sweep
    assert first is not None and first not in web_ids and first_sweep != second_sweep
    sweep_lines = [line for line in json_log() if line["request_id"] == first]
    assert any(line["message"].startswith("heroku ip_rule_create status=201") for line in sweep_lines)
    assert any(line["message"].startswith("sweep took") for line in sweep_lines)


def test_tokens_and_heroku_credentials_never_reach_a_log_line(
    client: FlaskClient, token_for: TokenFactory, addon: SimAddon
) -> None:
    heroku_key = "HRKU-AAbbCCddEEffGG00112233445566778899"
    config = Config(
        heroku_api_token=heroku_key,
        slack_signing_secret="slack-signing-secret-1234",
        webhook_secret="webhook-secret-5678",
    )
    admin = token_for("root", "admin")
    admin_secret = admin["Authorization"].removeprefix("Bearer ")
    forged = "dbt_0123456789ab_not-a-real-secret-but-still-secret"
    for fmt in logs.FORMATS:
        with capture(fmt, (SIM_TOKEN, *logs.secrets_of(config))) as stream:
            assert register(client, token_for, addon).status_code in (201, 409)
            assert client.get("/databases", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
            careless = logging.getLogger("tests.careless")
            careless.warning("retrying with headers %s", {"Authorization": f"Bearer {admin_secret}"})
            careless.error("token %s was refused", forged)
            careless.error("Heroku said: invalid credentials %s / %s", heroku_key, SIM_TOKEN)
            try:
                raise RuntimeError(f"signing with {config.slack_signing_secret} and {config.webhook_secret}")
            except RuntimeError:
                careless.exception("webhook failed")
            output = stream.getvalue()
        for secret in (
            admin_secret,
            forged,
            heroku_key,
            SIM_TOKEN,
            "slack-signing-secret-1234",
            "webhook-secret",
        ):
            assert secret not in output, (fmt, secret)
        assert output.count(logs.REDACTED) >= 5


def test_the_worker_process_logs_json_lines_by_default(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DRAWBRIDGE_")}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path}/w.db", "DRAWBRIDGE_SWEEP_INTERVAL": "0.2"})
    cli = [sys.executable, "-m", "app.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, capture_output=True, check=True)
    process = subprocess.Popen(
        [*cli, "worker", "--simulate"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    seen: list[str] = []
    for line in process.stdout:
        seen.append(line)
        if "worker sweeping every" in line:
            break
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=20)
    lines = [line for line in [*seen, *rest.splitlines()] if line.strip()]

    assert process.returncode == 0, "".join(lines)
    records = [json.loads(line) for line in lines]
    assert all(
        {"timestamp", "level", "logger", "message", "request_id"} <= record.keys() for record in records
    )
    assert any("SIMULATED HEROKU" in record["message"] for record in records)
    assert any(record["message"] == "worker stopped" for record in records)
