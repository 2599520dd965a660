"""The audit log's hash chain on PostgreSQL: intact under concurrent writers, broken by any edit, deletion or
reordering done behind the application's back, and guarded by a trigger against UPDATE and DELETE."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.runtime import Runtime
from app.services import audit
from tests.conftest import TokenFactory


def some_history(client: FlaskClient, token_for: TokenFactory, registered: Any, n: int = 4) -> dict[str, str]:
    registered()
    alice, bob = token_for("alice", "requester"), token_for("bob", "approver")
    for i in range(n):
        body = {"database": "main", "cidr": f"8.8.8.{i + 1}", "reason": f"INC-{i}"}
        request_id = client.post("/access-requests", json=body, headers=alice).get_json()["id"]
        client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob)
    return token_for("audra", "auditor")


def check(runtime: Runtime) -> audit.Verification:
    with runtime.sessions() as session:
        return audit.verify(session)


def as_superuser(runtime: Runtime, sql: str, **params: Any) -> None:
    """What someone with the database's keys could do: switch triggers off and change rows."""
    with runtime.engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text(sql), params)


def test_the_chain_of_a_normal_history_verifies(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    auditor = some_history(client, token_for, registered)
    answer = client.get("/audit-events/verify", headers=auditor).get_json()
    assert answer["ok"] is True and answer["first_broken"] is None
    assert answer["count"] == answer["head"]["seq"] > 8
    events = client.get("/audit-events?limit=200", headers=auditor).get_json()["items"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(events, events[1:], strict=False))


def test_an_edited_row_breaks_the_chain_where_it_was_edited(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    auditor = some_history(client, token_for, registered)
    as_superuser(runtime, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 5")
    answer = client.get("/audit-events/verify", headers=auditor).get_json()
    assert answer["ok"] is False
    assert answer["first_broken"]["seq"] == 5 and "altered" in answer["first_broken"]["problem"]
    assert answer["count"] == 4


def test_editing_details_is_caught_too(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    some_history(client, token_for, registered)
    as_superuser(
        runtime,
        "UPDATE audit_events SET details = jsonb_set(details, '{reason}', '\"nothing to see\"') "
        "WHERE action = 'access_request:create' AND seq = (SELECT min(seq) FROM audit_events "
        "WHERE action = 'access_request:create')",
    )
    result = check(runtime)
    assert not result.ok and result.first_broken is not None and "altered" in result.first_broken["problem"]


def test_a_deleted_row_is_found(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    some_history(client, token_for, registered)
    as_superuser(runtime, "DELETE FROM audit_events WHERE seq = 6")
    result = check(runtime)
    assert not result.ok and result.first_broken is not None
    assert result.first_broken["seq"] == 7 and "missing" in result.first_broken["problem"]


def test_a_deleted_row_whose_successors_were_renumbered_is_still_found(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    some_history(client, token_for, registered)
    as_superuser(runtime, "DELETE FROM audit_events WHERE seq = 6")
    as_superuser(runtime, "UPDATE audit_events SET seq = seq - 1 WHERE seq > 6")
    result = check(runtime)
    assert not result.ok and result.first_broken is not None and result.first_broken["seq"] == 6


def test_swapped_rows_are_found(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    some_history(client, token_for, registered)
    as_superuser(runtime, "UPDATE audit_events SET seq = seq + 1000 WHERE seq IN (3, 4)")
    as_superuser(
        runtime,
        "UPDATE audit_events SET seq = CASE seq WHEN 1003 THEN 4 ELSE 3 END WHERE seq IN (1003, 1004)",
    )
    result = check(runtime)
    assert not result.ok and result.first_broken is not None and result.first_broken["seq"] == 3


@pytest.mark.parametrize(
    "statement", ["UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"]
)
def test_the_database_refuses_to_update_or_delete_audit_rows(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, statement: str
) -> None:
    some_history(client, token_for, registered, n=1)
    with pytest.raises(DBAPIError, match="append-only"):
        with runtime.engine.begin() as conn:
            conn.execute(text(statement))
    assert check(runtime).ok


def test_concurrent_writers_keep_the_chain_whole(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime
) -> None:
    registered()
    people = [(token_for(f"dev{i}", "requester"), token_for(f"ops{i}", "approver")) for i in range(6)]
    barrier = threading.Barrier(len(people))
    failures: list[str] = []

    def work(i: int) -> None:
        own = client.application.test_client()
        asker, approver = people[i]
        barrier.wait()
        for j in range(5):
            body = {"database": "main", "cidr": f"8.8.{i}.{j + 1}", "reason": "race"}
            created = own.post("/access-requests", json=body, headers=asker)
            if created.status_code != 201:
                failures.append(created.get_data(as_text=True))
                continue
            own.post(f"/access-requests/{created.get_json()['id']}/approve", json={}, headers=approver)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(people))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert failures == []
    result = check(runtime)
    assert result.ok, result.first_broken
    with runtime.engine.connect() as conn:
        seqs = [row[0] for row in conn.execute(text("SELECT seq FROM audit_events ORDER BY id"))]
    assert sorted(seqs) == list(range(1, len(seqs) + 1))
    with runtime.engine.connect() as conn:
        counted = conn.execute(text("SELECT count(*) FROM audit_events WHERE action LIKE 'access_request:%'"))
        assert counted.scalar() == 60


def test_drawbridge_audit_verify_exits_nonzero_on_a_broken_chain(
    client: FlaskClient, token_for: TokenFactory, registered: Any, runtime: Runtime, config: Any
) -> None:
    some_history(client, token_for, registered, n=1)
    env = {**os.environ, "DATABASE_URL": config.database_url}
    intact = subprocess.run(
        [sys.executable, "-m", "app.cli", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert intact.returncode == 0 and '"ok": true' in intact.stdout
    as_superuser(runtime, "UPDATE audit_events SET action = 'access_request:deny' WHERE seq = 2")
    broken = subprocess.run(
        [sys.executable, "-m", "app.cli", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert broken.returncode == 1 and '"seq": 2' in broken.stdout
