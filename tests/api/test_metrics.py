"""`/metrics`: Prometheus text for an admin token, scraped after real requests, sweeps and Heroku calls."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.clock import ManualClock
from app.heroku.simulator import Simulator
from app.runtime import Runtime
from app.worker import Worker
from tests.conftest import TokenFactory

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: FlaskClient, headers: dict[str, str]) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} is exposed twice"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def admin(token_for: TokenFactory) -> dict[str, str]:
    return token_for("root", "admin")


def ask(client: FlaskClient, token_for: TokenFactory, *, duration: str = "1m") -> str:
    alice = token_for("alice", "requester")
    bob = token_for("bob", "approver")
    created = client.post(
        "/access-requests",
        json={"database": "main", "cidr": "8.8.8.8", "duration": duration, "reason": "INC-1"},
        headers=alice,
    )
    assert created.status_code == 201, created.get_json()
    request_id: str = created.get_json()["id"]
    assert client.post(f"/access-requests/{request_id}/approve", json={}, headers=bob).status_code == 200
    return request_id


def sweep_until(
    worker: Worker, client: FlaskClient, admin: dict[str, str], request_id: str, status: str
) -> dict[str, Any]:
    clock = worker.runtime.clock
    assert isinstance(clock, ManualClock)
    for _ in range(120):
        worker.run_once()
        body: dict[str, Any] = client.get(f"/access-requests/{request_id}", headers=admin).get_json()
        if body["status"] == status:
            return body
        clock.advance(1)
    raise AssertionError(f"{request_id} never became {status}")


def test_metrics_need_an_admin_token(client: FlaskClient, token_for: TokenFactory) -> None:
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.content_type == "application/problem+json"
    for role in ("requester", "approver", "auditor"):
        refused = client.get("/metrics", headers=token_for(f"someone-{role}", role))
        assert refused.status_code == 403, role
        assert refused.content_type == "application/problem+json"
    assert client.get("/metrics", headers=token_for("root", "admin")).status_code == 200


def test_http_requests_are_counted_and_timed_by_route_not_by_path(
    client: FlaskClient, token_for: TokenFactory, admin: dict[str, str]
) -> None:
    alice = token_for("alice", "requester")
    for missing in ("0b5d7f3c-1111-4222-8333-444455556666", "0b5d7f3c-1111-4222-8333-444455556667"):
        assert client.get(f"/access-requests/{missing}", headers=alice).status_code == 404
    assert client.get("/databases", headers=alice).status_code == 200
    assert client.get("/no-such-thing").status_code == 404

    samples = scrape(client, admin)

    by_id = "/access-requests/<uuid:request_id>"
    assert value(samples, "drawbridge_http_requests_total", method="GET", route=by_id, status="404") == 2
    assert (
        value(samples, "drawbridge_http_requests_total", method="GET", route="/databases", status="200") == 1
    )
    assert (
        value(samples, "drawbridge_http_requests_total", method="GET", route="unmatched", status="404") == 1
    )
    assert value(samples, "drawbridge_http_request_duration_seconds_count", method="GET", route=by_id) == 2
    assert not any("0b5d7f3c" in str(labels) for _, labels in samples)


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_grants_rules_heroku_calls_and_expiry_lag_follow_a_real_grant(
    client: FlaskClient,
    runtime: Runtime,
    clock: ManualClock,
    token_for: TokenFactory,
    registered: Callable[..., dict[str, Any]],
    admin: dict[str, str],
) -> None:
    registered()
    request_id = ask(client, token_for)
    worker = Worker(runtime)
    process = worker.identity.label

    active = sweep_until(worker, client, admin, request_id, "active")
    during = scrape(client, admin)
    assert value(during, "drawbridge_live_grants", database="main", status="active") == 1
    assert value(during, "drawbridge_live_grants", database="main", status="approved") == 0
    assert value(during, "drawbridge_heroku_rules", database="main", owner="drawbridge") == 1
    assert value(during, "drawbridge_heroku_rule_limit") == 60
    assert value(during, "drawbridge_heroku_rule_headroom", database="main") == 5
    assert value(during, "drawbridge_expiry_lag_seconds_count") == 0

    expires_at = datetime.fromisoformat(active["expires_at"])
    clock.set(expires_at + timedelta(seconds=1))
    sweep_until(worker, client, admin, request_id, "expired")
    after = scrape(client, admin)

    assert value(after, "drawbridge_live_grants", database="main", status="active") == 0
    assert value(after, "drawbridge_heroku_rules", database="main", owner="drawbridge") == 0
    assert value(after, "drawbridge_expiry_lag_seconds_count") == 1
    assert value(after, "drawbridge_expiry_lag_seconds_sum") == pytest.approx(1.0, abs=0.01)
    assert value(after, "drawbridge_expiry_lag_seconds_bucket", le="0.5") == 0
    assert value(after, "drawbridge_expiry_lag_seconds_bucket", le="1.0") == 1
    assert value(after, "drawbridge_expiry_lag_seconds_bucket", le="+Inf") == 1

    # The worker's Heroku calls come through its heartbeat, under its own name; the web process's
    # (the add-on lookup when the database was registered) under "web".
    created = value(
        after, "drawbridge_heroku_calls_total", process=process, operation="ip_rule_create", status="201"
    )
    assert created == 1
    deleted = value(
        after, "drawbridge_heroku_calls_total", process=process, operation="ip_rule_delete", status="200"
    )
    assert deleted == 1
    lookups = value(
        after, "drawbridge_heroku_calls_total", process="web", operation="addon_lookup", status="200"
    )
    assert lookups == 1
    assert (
        value(after, "drawbridge_heroku_calls_total", process="web", operation="ip_rule_create", status="201")
        is None
    )


def test_a_rule_that_cannot_be_deleted_is_shown_until_it_is(
    client: FlaskClient,
    runtime: Runtime,
    clock: ManualClock,
    simulator: Simulator,
    token_for: TokenFactory,
    registered: Callable[..., dict[str, Any]],
    admin: dict[str, str],
) -> None:
    registered()
    request_id = ask(client, token_for, duration="1h")
    worker = Worker(runtime)
    sweep_until(worker, client, admin, request_id, "active")

    simulator.script("ip_rule_delete", "500", "500", "500")  # every try of one delete call
    revoked = client.post(
        f"/access-requests/{request_id}/revoke", json={}, headers=token_for("root", "admin")
    )
    assert revoked.status_code == 200
    worker.run_once()
    clock.advance(1)
    failing = scrape(client, admin)
    assert value(failing, "drawbridge_undeletable_rules", database="main") == 1
    assert value(failing, "drawbridge_rules_awaiting_deletion", database="main") == 1
    assert value(failing, "drawbridge_oldest_rule_awaiting_deletion_seconds", database="main") == 1
    assert value(failing, "drawbridge_rows_waiting_for_retry", kind="ip_rule") == 1
    assert value(failing, "drawbridge_rows_waiting_for_retry", kind="notification") == 0
    process = worker.identity.label
    failed = value(
        failing, "drawbridge_heroku_calls_total", process=process, operation="ip_rule_delete", status="500"
    )
    assert failed == 3

    clock.advance(60)  # past the backoff; Heroku answers again
    worker.run_once()
    healed = scrape(client, admin)
    assert value(healed, "drawbridge_undeletable_rules", database="main") == 0
    assert value(healed, "drawbridge_rules_awaiting_deletion", database="main") == 0
    assert value(healed, "drawbridge_oldest_rule_awaiting_deletion_seconds", database="main") == 0
    assert value(healed, "drawbridge_rows_waiting_for_retry", kind="ip_rule") == 0


def test_workers_are_shown_while_alive_with_their_sweeps_and_budget(
    client: FlaskClient, runtime: Runtime, clock: ManualClock, admin: dict[str, str]
) -> None:
    assert value(scrape(client, admin), "drawbridge_workers_alive") == 0
    assert value(scrape(client, admin), "drawbridge_worker_last_sweep_age_seconds") is None

    worker = Worker(runtime)
    for _ in range(3):
        worker.run_once()
    worker.deliver_once()
    clock.advance(5)
    worker.run_once()
    clock.advance(2)

    samples = scrape(client, admin)
    process = worker.identity.label
    assert value(samples, "drawbridge_workers_alive") == 1
    assert value(samples, "drawbridge_worker_last_sweep_age_seconds") == 2
    sweeps = value(samples, "drawbridge_worker_job_duration_seconds_count", process=process, job="sweep")
    assert sweeps == 4
    budget = value(samples, "drawbridge_heroku_ratelimit_remaining", process=process)
    assert budget is not None and 0 < budget <= 4500
    assert value(samples, "drawbridge_heroku_ratelimit_remaining", process="web") is not None
    assert value(samples, "drawbridge_heroku_ratelimit_floor", priority="create") == 150
    assert value(samples, "drawbridge_heroku_ratelimit_floor", priority="delete") == 0

    clock.advance(runtime.config.heartbeat_stale)
    gone = scrape(client, admin)
    assert value(gone, "drawbridge_workers_alive") == 0
    assert value(gone, "drawbridge_worker_last_sweep_age_seconds") == runtime.config.heartbeat_stale + 2
    assert value(gone, "drawbridge_worker_job_duration_seconds_count", process=process, job="sweep") is None


def test_openmetrics_is_served_when_asked_for(client: FlaskClient, admin: dict[str, str]) -> None:
    response = client.get("/metrics", headers={**admin, "Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.get_data(as_text=True).rstrip().endswith("# EOF")


_WEB_PROCESS = textwrap.dedent(
    """
    import sys
    from app import create_app
    from app.config import Config

    app = create_app(Config(database_url="sqlite://", metrics_multiproc_dir=sys.argv[1]))
    client = app.test_client()
    for _ in range(int(sys.argv[2])):
        assert client.get("/healthz").status_code == 200
    """
)


def test_with_a_multiprocess_directory_every_web_process_is_counted(
    tmp_path: Path, runtime: Runtime, admin: dict[str, str]
) -> None:
    """gunicorn with several workers: each process writes its counts to PROMETHEUS_MULTIPROC_DIR (which
    prometheus-client reads at import) and a scrape answered by any of them sums them all."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    for requests in (2, 3):
        subprocess.run(
            [sys.executable, "-c", _WEB_PROCESS, str(directory), str(requests)],
            env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": ""},
            cwd=Path(__file__).resolve().parents[2],
            check=True,
            capture_output=True,
        )
    config = replace(runtime.config, metrics_multiproc_dir=str(directory))
    samples = scrape(create_app(runtime=replace(runtime, config=config)).test_client(), admin)
    assert value(samples, "drawbridge_http_requests_total", method="GET", route="/healthz", status="200") == 5
    # This process's own scrape is in memory, not in the directory: only the two writers are summed.
    assert (
        value(samples, "drawbridge_http_requests_total", method="GET", route="/metrics", status="200") is None
    )
    assert value(samples, "drawbridge_workers_alive") == 0
