"""`drawbridge audit export`: CSV or NDJSON files with the chain head, checkable offline event by event."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient

from app.clock import ManualClock
from app.config import Config
from app.models import AuditEvent
from app.services import audit
from tests.conftest import TokenFactory


def history(client: FlaskClient, token_for: TokenFactory, registered: Any, clock: ManualClock) -> None:
    registered()
    alice = token_for("alice", "requester")
    for i in range(5):
        clock.advance(timedelta(hours=1))
        body = {"database": "main", "cidr": f"8.8.8.{i + 1}", "reason": f'=cmd|"/c calc"!A{i}, INC-{i}'}
        client.post("/access-requests", json=body, headers=alice)


def export(config: Config, tmp_path: Path, *args: str) -> tuple[Path, dict[str, Any]]:
    output = tmp_path / "audit.out"
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "audit", "export", "--output", str(output), *args],
        env={**os.environ, "DATABASE_URL": config.database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads((tmp_path / "audit.out.chain.json").read_text())
    return output, summary


def recomputed(row: dict[str, Any], previous: str) -> str:
    event = AuditEvent(
        seq=int(row["seq"]),
        occurred_at=datetime.fromisoformat(row["occurred_at"]),
        actor=row["actor"],
        on_behalf_of=row["on_behalf_of"] or None,
        source=row["source"],
        action=row["action"],
        request_id=uuid.UUID(row["request_id"]) if row["request_id"] else None,
        database=row["database"] or None,
        details=row["details"] if isinstance(row["details"], dict) else json.loads(row["details"]),
    )
    return audit.link(previous, event)


def test_a_csv_export_carries_every_event_its_chain_head_and_checksum(
    client: FlaskClient,
    token_for: TokenFactory,
    registered: Any,
    clock: ManualClock,
    config: Config,
    tmp_path: Path,
) -> None:
    history(client, token_for, registered, clock)

    output, summary = export(config, tmp_path, "--format", "csv")

    text = output.read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    assert summary["count"] == len(rows) == 8  # 2 tokens, 1 registration, 5 requests
    assert summary["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    assert summary["chain_head"] == {"seq": 8, "hash": rows[-1]["hash"]}
    assert (summary["first_seq"], summary["last_seq"]) == (1, 8)
    creates = [r for r in rows if r["action"] == "access_request:create"]
    assert all(json.loads(r["details"])["reason"].startswith("=cmd") for r in creates)  # JSON cell: safe
    previous = audit.GENESIS
    for row in rows:  # an auditor can check every link offline, from the file alone
        assert row["prev_hash"] == previous
        assert recomputed(row, previous) == row["hash"]
        previous = row["hash"]


def test_an_ndjson_export_of_a_window_holds_just_that_window(
    client: FlaskClient,
    token_for: TokenFactory,
    registered: Any,
    clock: ManualClock,
    config: Config,
    tmp_path: Path,
) -> None:
    history(client, token_for, registered, clock)
    since, until = "2026-01-05T11:00:00Z", "2026-01-05T13:00:00+00:00"

    output, summary = export(config, tmp_path, "--format", "ndjson", "--since", since, "--until", until)

    events = [json.loads(line) for line in output.read_text().splitlines()]
    assert [e["details"]["cidr"] for e in events] == ["8.8.8.2/32", "8.8.8.3/32"]
    assert summary["count"] == 2 and summary["since"].startswith("2026-01-05T11:00:00")
    assert summary["chain_head"]["seq"] == 8  # the head of the whole chain when exported
    assert recomputed(events[0], events[0]["prev_hash"]) == events[0]["hash"]


def test_a_bad_time_is_refused(config: Config, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "audit",
            "export",
            "--format",
            "csv",
            "--output",
            str(tmp_path / "x"),
            "--since",
            "last tuesday",
        ],
        env={**os.environ, "DATABASE_URL": config.database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "ISO 8601" in result.stderr
