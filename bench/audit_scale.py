"""The audit log at scale on PostgreSQL: first pages, full exports and chain verification over N events.

    .venv/bin/python bench/audit_scale.py --events 1000000 [--rounds 3] [--runs 2] [--keep]

Creates a scratch database beside the admin one (`--admin-url`, default the local service), migrates it,
loads N events that form a valid hash chain (built with app.services.audit.link, bulk loaded with COPY,
then VACUUM ANALYZE), and measures against the audit log's scale targets:

- a filtered first page, server-side: `audit.list_events` timed in-process for a few hundred filter values
  (actor, on_behalf_of, database, action, request_id, a window of an hour to a month; and two combined:
  database + window, actor + action), and the same pages through the Flask test client (authentication,
  JSON rendering); target p99 <= 10 ms, judged for one filter and for two;
- a full export: `drawbridge audit export --format csv|ndjson` as a child process, wall time and the
  child's peak RSS (wait4); target >= 50,000 rows/s and < 150 MB for CSV;
- `drawbridge audit verify` as a child process: seconds, and that it reports ok over N events; target
  < 30 s for a million.

Prints a JSON report and writes bench/results/audit_scale.json and .md. The whole run is bounded by
`--budget` seconds; the scratch database is dropped at the end (or on failure) unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from alembic import command
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app import create_app
from app.cli import alembic_config
from app.clock import ManualClock
from app.config import Config, normalize_database_url
from app.models import AuditEvent, Role
from app.runtime import build_runtime
from app.services import audit, tokens
from app.services.identity import Principal

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# `drawbridge` is `python -m app.cli`; run this way, the child imports the app of this checkout (PYTHONPATH).
DRAWBRIDGE = [sys.executable, "-m", "app.cli"]
TARGET_PAGE_P99_MS = 10.0
TARGET_EXPORT_ROWS_S = 50_000.0
TARGET_EXPORT_RSS_MB = 150.0
TARGET_VERIFY_S_PER_MILLION = 30.0
COPY_COLUMNS = (
    "seq",
    "prev_hash",
    "hash",
    "occurred_at",
    "actor",
    "on_behalf_of",
    "source",
    "action",
    "request_id",
    "database",
    "details",
)
REASONS = (
    "debug a slow query",
    "incident INC-2211: replication lag",
    "monthly billing reconciliation",
    "backfill after migration",
    "Prüfung der Buchungen für März",
    "check a customer's order, ticket #48213",
    "on-call: disk usage alert",
)


class BudgetExceeded(Exception):
    """The run went past --budget seconds."""


# ---------------------------------------------------------------------------------------------- generation


class _Draft:
    """The fields `audit.canonical` reads, without the ORM's instrumentation (twice as fast to build). Every
    `CROSS_CHECK`th draft is compared with a transient AuditEvent built from the same fields."""

    __slots__ = (
        "seq",
        "occurred_at",
        "actor",
        "on_behalf_of",
        "source",
        "action",
        "request_id",
        "database",
        "details",
    )

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


CROSS_CHECK = 5_000


@dataclass
class _Request:
    id: uuid.UUID
    user: str
    database: str
    cidr: str
    steps: list[str]
    bot: str | None = None
    rule_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    heroku_rule_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class Population:
    """Who and what the generated log is about; the values the filters are drawn from."""

    users: list[str]
    approvers: list[str]
    bots: list[str]
    databases: list[str]
    user_weights: list[float]
    database_weights: list[float]
    actions: set[str] = field(default_factory=set)
    actors: set[str] = field(default_factory=set)
    principals: set[str] = field(default_factory=set)  # on_behalf_of values
    request_ids: list[uuid.UUID] = field(default_factory=list)
    first_at: datetime | None = None
    last_at: datetime | None = None


def _zipf(n: int, s: float) -> list[float]:
    return [1.0 / (rank**s) for rank in range(1, n + 1)]


def population() -> Population:
    users = [f"user-{n:03d}" for n in range(1, 171)]
    approvers = [f"approver-{n:02d}" for n in range(1, 26)]
    bots = [f"bot-{name}" for name in ("deploy", "ci", "oncall", "reports", "migrate")]
    databases = ["main", "billing", "analytics", "orders", "users", "search", "events", "ledger"]
    databases += [f"shard-{n:02d}" for n in range(1, 13)]
    return Population(
        users=users,
        approvers=approvers,
        bots=bots,
        databases=databases,
        user_weights=_zipf(len(users), 0.9),
        database_weights=_zipf(len(databases), 1.0),
    )


class EventGenerator:
    """A plausible interleaving of access-request lifecycles (create, approve, provision, the IP rule's
    create and authorize, activate, extensions, expiry or revocation, the rule's release and delete) with a
    sprinkle of administrative events, spread over `span` ending at `end`."""

    def __init__(self, pop: Population, *, rng: random.Random, start: datetime, mean_gap_us: float) -> None:
        self.pop = pop
        self.rng = rng
        self.now = start
        self.mean_gap_us = mean_gap_us
        self.open: list[_Request] = []
        self.requests = 0

    def _user(self) -> str:
        return self.rng.choices(self.pop.users, self.pop.user_weights)[0]

    def _approver(self) -> str:
        return self.rng.choice(self.pop.approvers)

    def _new_request(self) -> _Request:
        rng = self.rng
        roll = rng.random()
        if roll < 0.85:
            decision = ["access_request:approve"]
        elif roll < 0.90:
            decision = ["access_request:auto_approve"]
        elif roll < 0.95:
            decision = ["access_request:deny"]
        else:
            decision = ["access_request:cancel"]
        steps = ["access_request:create", *decision]
        if decision[0] in ("access_request:approve", "access_request:auto_approve"):
            steps += ["access_request:provision", "ip_rule:create", "ip_rule:authorize"]
            steps += ["access_request:activate"]
            roll = rng.random()
            if roll < 0.08:
                steps += ["access_request:request_extension", "access_request:approve_extension"]
            elif roll < 0.12:
                steps += ["access_request:extend"]
            roll = rng.random()
            ending = "access_request:expire"
            if roll < 0.06:
                ending = "access_request:revoke"
            elif roll < 0.08:
                ending = "access_request:fail"
            steps += [ending, "ip_rule:release", "ip_rule:delete"]
        self.requests += 1
        request = _Request(
            id=uuid.UUID(int=rng.getrandbits(128), version=4),
            user=self._user(),
            database=rng.choices(self.pop.databases, self.pop.database_weights)[0],
            cidr=f"{rng.randint(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randint(1, 254)}/32",
            steps=steps,
            bot=rng.choice(self.pop.bots) if rng.random() < 0.06 else None,
        )
        if len(self.pop.request_ids) < 5000:
            self.pop.request_ids.append(request.id)
        elif rng.random() < 0.02:
            self.pop.request_ids[rng.randrange(5000)] = request.id
        return request

    def _advance(self, request: _Request) -> dict[str, Any]:
        action = request.steps.pop(0)
        rng = self.rng
        worker = {"actor": "worker", "on_behalf_of": None, "source": "worker"}
        source = "slack" if rng.random() < 0.3 else "api"
        by_user: dict[str, Any] = {"actor": request.user, "on_behalf_of": None, "source": source}
        if request.bot is not None:
            by_user = {"actor": request.bot, "on_behalf_of": request.user, "source": "api"}
        by_approver = {"actor": self._approver(), "on_behalf_of": None, "source": source}
        rule = {"rule_id": request.rule_id, "heroku_rule_id": request.heroku_rule_id, "cidr": request.cidr}
        base: dict[str, Any] = {"action": action, "request_id": request.id, "database": request.database}
        if action == "access_request:create":
            duration = rng.choice((900, 3600, 3600, 7200, 14400, 28800))
            details = {"cidr": request.cidr, "duration": duration, "reason": rng.choice(REASONS)}
            return {**base, **by_user, "details": {**details, "status": "pending"}}
        if action == "access_request:approve":
            comment = rng.choice((None, None, "ok", "approved for the incident"))
            return {**base, **by_approver, "details": {"comment": comment, "status": "approved"}}
        if action == "access_request:auto_approve":
            policy = {"max_duration": 3600, "users": [request.user]}
            return {**base, **by_user, "details": {"rule": 0, "policy": policy, "status": "approved"}}
        if action in ("access_request:deny", "access_request:revoke"):
            reason = rng.choice(("not needed", "use the replica", "incident over"))
            return {**base, **by_approver, "details": {"reason": reason, "status": action.split(":")[1]}}
        if action == "access_request:cancel":
            return {**base, **by_user, "details": {"reason": "changed my mind", "status": "cancelled"}}
        if action == "access_request:provision":
            details = {"rule_id": request.rule_id, "shared": False, "status": "provisioning"}
            return {**base, **worker, "details": details}
        if action == "ip_rule:create":
            details = {**rule, "heroku_status": "Authorizing", "attempts": 1}
            return {**base, **worker, "request_id": None, "details": details}
        if action == "ip_rule:authorize":
            return {**base, **worker, "request_id": None, "details": rule}
        if action == "access_request:activate":
            expires = (self.now + timedelta(hours=1)).isoformat()
            details = {**rule, "expires_at": expires, "status": "active"}
            return {**base, **worker, "details": details}
        if action == "access_request:request_extension":
            details = {"reason": "still debugging", "extension": 3600, "round": 2}
            return {**base, **by_user, "details": details}
        if action == "access_request:approve_extension":
            return {**base, **by_approver, "details": {"extension": 3600, "round": 2}}
        if action == "access_request:extend":
            details = {"added": 1800, "duration": 5400, "approved_by": "policy (self-extension)"}
            return {**base, **by_user, "details": {**details, "expires_at": self.now.isoformat()}}
        if action in ("access_request:expire", "access_request:fail"):
            status = "expired" if action.endswith("expire") else "failed"
            return {**base, **worker, "details": {"reason": None, "status": status}}
        if action == "ip_rule:release":
            details = {**rule, "previous_status": "authorized"}
            return {**base, **worker, "request_id": None, "details": details}
        if action == "ip_rule:delete":
            details = {**rule, "deleted_at_heroku": [request.heroku_rule_id], "already_gone": False}
            return {**base, **worker, "request_id": None, "details": {**details, "attempts": 1}}
        raise AssertionError(action)

    def _administrative(self) -> dict[str, Any]:
        rng = self.rng
        details: dict[str, Any]
        cli = {"actor": "cli", "on_behalf_of": None, "source": "cli", "request_id": None}
        roll = rng.random()
        if roll < 0.4:
            user = self._user()
            details = {"token_id": f"{rng.getrandbits(48):012x}", "user": user, "roles": ["requester"]}
            return {**cli, "action": "api_token:create", "database": None, "details": details}
        if roll < 0.6:
            details = {"token_id": f"{rng.getrandbits(48):012x}", "user": self._user()}
            return {**cli, "action": "api_token:revoke", "database": None, "details": details}
        if roll < 0.75:
            slack = f"U{rng.getrandbits(40):010X}"
            details = {"user": self._user(), "slack_user_id": slack, "previous": None}
            return {**cli, "action": "user:link_slack", "database": None, "details": details}
        if roll < 0.9:
            admin = {"actor": self._approver(), "on_behalf_of": None, "source": "api", "request_id": None}
            changes = {"max_duration": [3600, rng.choice((7200, 14400))]}
            database = rng.choice(self.pop.databases)
            return {**admin, "action": "database:update_policy", "database": database, "details": changes}
        worker = {"actor": "worker", "on_behalf_of": None, "source": "worker", "request_id": None}
        details = {"event": "access_ready", "attempts": 8, "target": "slack"}
        return {**worker, "action": "notification:give_up", "database": None, "details": details}

    def next_fields(self) -> dict[str, Any]:
        self.now += timedelta(microseconds=max(1, int(self.rng.expovariate(1.0 / self.mean_gap_us))))
        roll = self.rng.random()
        if roll < 0.01:
            values = self._administrative()
        elif not self.open or (len(self.open) < 400 and roll < 0.2):
            request = self._new_request()
            self.open.append(request)
            values = self._advance(request)
        else:
            index = self.rng.randrange(len(self.open))
            request = self.open[index]
            values = self._advance(request)
            if not request.steps:
                self.open[index] = self.open[-1]
                self.open.pop()
        values["occurred_at"] = self.now
        return values


def chain_rows(gen: EventGenerator, *, count: int, seq: int, previous: str) -> Iterator[tuple[Any, ...]]:
    """COPY rows for `count` events after (seq, previous): each linked with app.services.audit.link."""
    pop = gen.pop
    for _ in range(count):
        seq += 1
        values = gen.next_fields()
        draft = _Draft(seq=seq, **values)
        digest = audit.link(previous, draft)  # type: ignore[arg-type]
        if seq % CROSS_CHECK == 1:
            real = AuditEvent(**draft.fields())
            if audit.link(previous, real) != digest:
                raise AssertionError(f"the draft of event {seq} does not hash like an AuditEvent")
        pop.actions.add(values["action"])
        pop.actors.add(values["actor"])
        if values["on_behalf_of"] is not None:
            pop.principals.add(values["on_behalf_of"])
        if pop.first_at is None:
            pop.first_at = values["occurred_at"]
        pop.last_at = values["occurred_at"]
        yield (
            seq,
            previous,
            digest,
            values["occurred_at"],
            values["actor"],
            values["on_behalf_of"],
            values["source"],
            values["action"],
            values["request_id"],
            values["database"],
            json.dumps(values["details"], separators=(",", ":"), ensure_ascii=False),
        )
        previous = digest


# ------------------------------------------------------------------------------------------------ database


def libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(admin_url: str) -> str:
    name = f"drawbridge_bench_audit_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    engine.dispose()


def load(url: str, gen: EventGenerator, *, total: int) -> dict[str, Any]:
    """Append events after the existing chain until it holds `total` events; COPY, then VACUUM ANALYZE."""
    started = time.perf_counter()
    with psycopg.connect(libpq_url(url)) as conn:
        head = conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
        seq, previous = (int(head[0]), str(head[1])) if head else (0, audit.GENESIS)
        count = total - seq
        columns = ", ".join(COPY_COLUMNS)
        with conn.cursor() as cur, cur.copy(f"COPY audit_events ({columns}) FROM STDIN") as copy:
            for row in chain_rows(gen, count=count, seq=seq, previous=previous):
                copy.write_row(row)
    copied = time.perf_counter()
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) audit_events")
        size = conn.execute("SELECT pg_total_relation_size('audit_events')").fetchone()
    return {
        "events_loaded": count,
        "requests": gen.requests,
        "copy_s": round(copied - started, 1),
        "vacuum_analyze_s": round(time.perf_counter() - copied, 1),
        "table_with_indexes_mb": round(int(size[0]) / 2**20, 1) if size else None,
    }


# ------------------------------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary_ms(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
    }


# ------------------------------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class Probe:
    kind: str
    filters: audit.EventFilter

    def query(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in ("actor", "on_behalf_of", "database", "action", "request_id", "since", "until"):
            value = getattr(self.filters, name)
            if value is not None:
                out[name] = value.isoformat() if isinstance(value, datetime) else str(value)
        return out


WINDOWS = (timedelta(hours=1), timedelta(days=1), timedelta(days=7), timedelta(days=30))


def probes(pop: Population, rng: random.Random, per_kind: int) -> list[Probe]:
    """Filter values of each kind, drawn from what was loaded; windows of an hour to a month."""
    assert pop.first_at is not None and pop.last_at is not None
    first = pop.first_at
    span = (pop.last_at - first).total_seconds()

    def window() -> tuple[datetime, datetime]:
        width = rng.choice(WINDOWS)
        start = first + timedelta(seconds=rng.uniform(0, max(0.0, span - width.total_seconds())))
        return start, start + width

    actors = sorted(pop.actors)
    actions = sorted(pop.actions)
    principals = sorted(pop.principals)
    out: list[Probe] = []
    for _ in range(per_kind):
        since, until = window()
        out += [
            Probe("actor", audit.EventFilter(actor=rng.choice(actors))),
            Probe("database", audit.EventFilter(database=rng.choice(pop.databases))),
            Probe("action", audit.EventFilter(action=rng.choice(actions))),
            Probe("request_id", audit.EventFilter(request_id=rng.choice(pop.request_ids))),
            Probe("since_until", audit.EventFilter(since=since, until=until)),
        ]
        if principals:
            out.append(Probe("on_behalf_of", audit.EventFilter(on_behalf_of=rng.choice(principals))))
        since, until = window()
        db = rng.choice(pop.databases)
        out.append(Probe("database+since_until", audit.EventFilter(database=db, since=since, until=until)))
        out.append(
            Probe("actor+action", audit.EventFilter(actor=rng.choice(actors), action=rng.choice(actions)))
        )
    rng.shuffle(out)
    return out


def by_kind(samples: list[tuple[Probe, float, int]]) -> dict[str, Any]:
    kinds: dict[str, list[tuple[float, int]]] = {}
    for probe, seconds, rows in samples:
        kinds.setdefault(probe.kind, []).append((seconds, rows))
    return {
        kind: {
            **summary_ms([s for s, _ in values]),
            "median_rows": statistics.median(r for _, r in values),
        }
        for kind, values in sorted(kinds.items())
    }


def groups(samples: list[tuple[Probe, float, int]]) -> dict[str, Any]:
    """All pages; pages with one filter (a single column, or a time window); pages with two combined."""
    single = [s for probe, s, _ in samples if "+" not in probe.kind]
    combined = [s for probe, s, _ in samples if "+" in probe.kind]
    return {
        "all": summary_ms([s for _, s, _ in samples]),
        "one_filter": summary_ms(single),
        "two_filters": summary_ms(combined),
    }


def explain(engine: Any, probe: Probe) -> list[str]:
    """EXPLAIN ANALYZE of the first-page query for `probe`: EventFilter.apply, by seq, limit 101 (the query
    list_events runs here; a list_events that builds its query otherwise would need this to follow)."""
    with Session(engine) as session:
        query = probe.filters.apply(select(*audit.CHAIN_COLUMNS), session)
        query = query.order_by(AuditEvent.seq).limit(101)
    compiled = query.compile(dialect=engine.dialect)
    with engine.connect() as conn:
        result = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {compiled}", dict(compiled.params))
        return [str(row[0]) for row in result]


def measure_pages(
    url: str,
    pop: Population,
    *,
    secret: str,
    rounds: int,
    per_kind: int,
    seed: int,
    deadline: Callable[[], None],
) -> dict[str, Any]:
    """`audit.list_events` in-process, one session per page as a request has: the time covers the pool
    checkout (with its pre-ping), the query and building the page. Then the same pages over HTTP."""
    # One token asks for thousands of pages a minute: a limit it never reaches, still counted on every page.
    app = create_app(Config(database_url=url, rate_limit="1000000/minute"))
    rt = app.extensions["drawbridge"]
    auditor = Principal(user_id=1, name="bench-auditor", roles=frozenset({Role.AUDITOR}))
    rng = random.Random(seed)
    sample = probes(pop, rng, per_kind)
    for probe in sample[:50]:  # warm the pool, SQLAlchemy's statement cache and PostgreSQL's buffers
        with rt.sessions() as session:
            audit.list_events(session, principal=auditor, filters=probe.filters, cursor=None, limit=100)
    service: list[tuple[Probe, float, int]] = []
    per_round: list[dict[str, Any]] = []
    for _ in range(rounds):
        deadline()
        this_round: list[float] = []
        for probe in sample:
            with rt.sessions() as session:
                start = time.perf_counter()
                page = audit.list_events(
                    session, principal=auditor, filters=probe.filters, cursor=None, limit=100
                )
                elapsed = time.perf_counter() - start
            service.append((probe, elapsed, len(page.items)))
            this_round.append(elapsed)
        per_round.append(summary_ms(this_round))
        rng.shuffle(sample)
    # The same pages over HTTP in the test client: token check, argument parsing, JSON rendering.
    headers = {"Authorization": f"Bearer {secret}"}
    client = app.test_client()
    http: list[tuple[Probe, float, int]] = []
    for probe in sample[:50]:
        client.get("/audit-events", query_string=probe.query(), headers=headers)
    for _ in range(max(1, rounds - 1)):
        deadline()
        for probe in sample:
            start = time.perf_counter()
            response = client.get("/audit-events", query_string=probe.query(), headers=headers)
            elapsed = time.perf_counter() - start
            if response.status_code != 200:
                raise RuntimeError(f"GET /audit-events {probe.query()}: {response.status_code}")
            http.append((probe, elapsed, len(response.get_json()["items"])))
        rng.shuffle(sample)
    slowest: dict[str, tuple[Probe, float]] = {}
    for probe, seconds, _ in service:
        if probe.kind not in slowest or seconds > slowest[probe.kind][1]:
            slowest[probe.kind] = (probe, seconds)
    plans = {}
    for kind, (probe, seconds) in sorted(slowest.items()):
        plans[kind] = {
            "filters": probe.query(),
            "ms": round(seconds * 1000, 2),
            "plan": explain(rt.engine, probe),
        }
    rt.close()
    return {
        "filter_values": len(sample),
        "rounds": rounds,
        "service": {**groups(service), "per_round": per_round, "by_kind": by_kind(service)},
        "http_test_client": {**groups(http), "by_kind": by_kind(http)},
        "slowest_plans": plans,
        "target_p99_ms": TARGET_PAGE_P99_MS,
    }


# ------------------------------------------------------------------------------------------ child processes


@dataclass
class ChildRun:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run_child(argv: list[str], *, url: str, timeout: float) -> ChildRun:
    """Run `argv` with DATABASE_URL set; wall time and the child's own peak RSS (from wait4)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": path}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # the budget ran out (SIGALRM) or ^C: do not leave the child running
            proc.kill()
            proc.wait()
            raise
        finally:
            killer.cancel()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode < 0:
        raise RuntimeError(
            f"{' '.join(argv[3:])} was killed after {timeout:.0f} s (signal {-proc.returncode})"
        )
    return ChildRun(seconds, usage.ru_maxrss / 1024, proc.returncode, stdout, stderr)


def measure_export(
    url: str, *, events: int, fmt: str, runs: int, timeout: Callable[[], float]
) -> dict[str, Any]:
    results = []
    with tempfile.TemporaryDirectory(prefix="audit-export-") as tmp:
        output = Path(tmp) / f"audit.{fmt}"
        argv = [*DRAWBRIDGE, "audit", "export", "--format", fmt, "--output", str(output)]
        # An empty selection: the interpreter, imports and connection, i.e. the floor of the peak RSS.
        empty = run_child([*argv, "--since", "2999-01-01T00:00:00Z"], url=url, timeout=timeout())
        for _ in range(runs):
            run = run_child(argv, url=url, timeout=timeout())
            if run.returncode != 0:
                raise RuntimeError(f"export failed: {run.stderr[-2000:]}")
            sidecar = json.loads(output.with_name(output.name + ".chain.json").read_text())
            if sidecar["count"] != events:
                raise RuntimeError(f"export wrote {sidecar['count']} events, expected {events}")
            results.append(
                {
                    "seconds": round(run.seconds, 2),
                    "rows_per_s": round(events / run.seconds),
                    "peak_rss_mb": round(run.peak_rss_mb, 1),
                    "file_mb": round(output.stat().st_size / 2**20, 1),
                }
            )
    worst_rate = min(r["rows_per_s"] for r in results)
    worst_rss = max(r["peak_rss_mb"] for r in results)
    return {
        "format": fmt,
        "runs": results,
        "rows_per_s": worst_rate,
        "peak_rss_mb": worst_rss,
        "empty_selection_peak_rss_mb": round(empty.peak_rss_mb, 1),
        "empty_selection_seconds": round(empty.seconds, 2),
        "target_rows_per_s": TARGET_EXPORT_ROWS_S,
        "target_peak_rss_mb": TARGET_EXPORT_RSS_MB,
    }


def measure_verify(url: str, *, events: int, runs: int, timeout: Callable[[], float]) -> dict[str, Any]:
    results = []
    for _ in range(runs):
        run = run_child([*DRAWBRIDGE, "audit", "verify"], url=url, timeout=timeout())
        report = json.loads(run.stdout.strip().splitlines()[-1])
        if not report["ok"] or report["count"] != events:
            raise RuntimeError(f"verify did not confirm {events} events: {run.stdout} {run.stderr[-2000:]}")
        results.append(
            {
                "seconds": round(run.seconds, 2),
                "rows_per_s": round(events / run.seconds),
                "peak_rss_mb": round(run.peak_rss_mb, 1),
                "ok": report["ok"],
                "count": report["count"],
            }
        )
    target = TARGET_VERIFY_S_PER_MILLION * events / 1_000_000
    return {
        "runs": results,
        "seconds": max(r["seconds"] for r in results),
        "target_seconds": round(target, 2),
    }


# -------------------------------------------------------------------------------------------------- report


def machine(url: str) -> dict[str, Any]:
    with psycopg.connect(libpq_url(url)) as conn:
        settings = {}
        for name in ("server_version", "shared_buffers", "work_mem", "effective_cache_size", "jit"):
            row = conn.execute(f"SHOW {name}").fetchone()
            settings[name] = row[0] if row else None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or platform.machine(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "postgresql": settings,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each figure against its target. The page over HTTP is for reference: the target is server-side."""
    pages, verify = report["pages"], report["verify"]
    at_most_page = (f"<= {TARGET_PAGE_P99_MS:g}", lambda v: v <= TARGET_PAGE_P99_MS)
    rate = (f">= {TARGET_EXPORT_ROWS_S:,.0f}", lambda v: v >= TARGET_EXPORT_ROWS_S)
    memory = (f"< {TARGET_EXPORT_RSS_MB:g}", lambda v: v < TARGET_EXPORT_RSS_MB)
    service, http = pages["service"], pages["http_test_client"]
    rows: list[tuple[str, float, tuple[str, Callable[[float], bool]]]] = [
        ("first page p99, one filter, server-side (ms)", service["one_filter"]["p99_ms"], at_most_page),
        ("first page p99, two filters, server-side (ms)", service["two_filters"]["p99_ms"], at_most_page),
        ("(reference) first page p99, all, over HTTP (ms)", http["all"]["p99_ms"], at_most_page),
    ]
    for fmt, figures in report["export"].items():
        rows.append((f"{fmt.upper()} export (rows/s)", figures["rows_per_s"], rate))
        rows.append((f"{fmt.upper()} export peak RSS (MB)", figures["peak_rss_mb"], memory))
    target = verify["target_seconds"]
    rows.append(("verify (s)", verify["seconds"], (f"< {target:g}", lambda v: v < target)))
    return [
        {"metric": name, "measured": value, "target": text, "pass": check(value)}
        for name, value, (text, check) in rows
    ]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    pg = m["postgresql"]
    lines = [
        "# Audit log at scale",
        "",
        f"`{report['command']}`",
        "",
        f"{report['events']:,} events on PostgreSQL {pg['server_version']}"
        f" (shared_buffers {pg['shared_buffers']}, jit {pg['jit']}); {m['nproc']} CPUs,"
        f" {m['memory_gb']} GB, Python {m['python']}; {m['date']}. Load average (1, 5, 15 min; the machine"
        f" is shared) before each phase: "
        + "; ".join(f"{k} {' '.join(f'{x:.1f}' for x in v)}" for k, v in m["load_average_1_5_15_min"].items())
        + ".",
        f"Load: {report['load']['copy_s']} s COPY (chain built with `audit.link`) + "
        f"{report['load']['vacuum_analyze_s']} s VACUUM ANALYZE; table with indexes "
        f"{report['load']['table_with_indexes_mb']} MB.",
        "",
        "| metric | measured | target | |",
        "|---|---:|---|---|",
    ]
    for row in report["verdicts"]:
        lines.append(
            f"| {row['metric']} | {row['measured']:,} | {row['target']} "
            f"| {'pass' if row['pass'] else 'MISS'} |"
        )
    pages = report["pages"]
    lines += [
        "",
        f"## First page (limit 100), {pages['filter_values']} filter values x {pages['rounds']} rounds",
        "",
        "| filter | server median ms | server p99 ms | server max ms | HTTP median ms | HTTP p99 ms | rows |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, s in pages["service"]["by_kind"].items():
        h = pages["http_test_client"]["by_kind"].get(kind, {})
        lines.append(
            f"| {kind} | {s['median_ms']} | {s['p99_ms']} | {s['max_ms']} | {h.get('median_ms', '')} "
            f"| {h.get('p99_ms', '')} | {s['median_rows']} |"
        )
    for group in ("one_filter", "two_filters", "all"):
        s, h = pages["service"][group], pages["http_test_client"][group]
        lines.append(
            f"| **{group.replace('_', ' ')}** | {s['median_ms']} | {s['p99_ms']} | {s['max_ms']} "
            f"| {h['median_ms']} | {h['p99_ms']} | |"
        )
    lines += ["", "## Export and verify (child processes; peak RSS from wait4)", ""]
    for fmt, e in report["export"].items():
        runs = ", ".join(
            f"{r['seconds']} s / {r['rows_per_s']:,} rows/s / {r['peak_rss_mb']} MB" for r in e["runs"]
        )
        lines.append(
            f"- `audit export --format {fmt}`: {runs}"
            f" (empty selection: {e['empty_selection_peak_rss_mb']} MB)"
        )
    v = report["verify"]
    runs = ", ".join(f"{r['seconds']} s / {r['peak_rss_mb']} MB" for r in v["runs"])
    lines.append(f"- `audit verify`: {runs}; ok, count {v['runs'][0]['count']:,}")
    lines += ["", "## Plan of the slowest first page of each kind", ""]
    for kind, p in pages["slowest_plans"].items():
        lines += [f"### {kind}: {p['ms']} ms, `{json.dumps(p['filters'])}`", "", "```", *p["plan"], "```", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the filter values")
    parser.add_argument("--per-kind", type=int, default=50, help="filter values of each kind")
    parser.add_argument("--runs", type=int, default=2, help="runs of each export and of verify")
    parser.add_argument("--days", type=float, default=365.0, help="time the events span")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--budget", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--no-ndjson", action="store_true", help="skip the NDJSON export")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get(
            "DRAWBRIDGE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a database to connect to for CREATE/DROP DATABASE",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for the results")
    args = parser.parse_args()
    if args.events < 1000:
        parser.error("--events must be at least 1000")

    began = time.monotonic()

    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        raise BudgetExceeded(f"the run took longer than --budget {args.budget:g} s")

    def deadline() -> None:
        if time.monotonic() - began > args.budget:
            raise BudgetExceeded(f"the run took longer than --budget {args.budget:g} s")

    def remaining() -> float:
        return max(1.0, float(args.budget) - (time.monotonic() - began))

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(math.ceil(args.budget)))
    admin_url = normalize_database_url(args.admin_url)
    url = create_database(admin_url)
    print(f"scratch database {make_url(url).database}", file=sys.stderr)
    try:
        command.upgrade(alembic_config(url), "head")
        rng = random.Random(args.seed)
        end = datetime.now(UTC).replace(microsecond=0)
        start = end - timedelta(days=args.days)
        pop = population()
        # The auditor's token is the first event of the chain (created at the start of the span).
        rt = build_runtime(Config(database_url=url))
        with rt.sessions() as session:
            _, secret = tokens.create_token(
                session, user_name="bench-auditor", roles=["auditor"], clock=ManualClock(start)
            )
        rt.close()
        gen = EventGenerator(pop, rng=rng, start=start, mean_gap_us=args.days * 86_400e6 / args.events)
        print(f"loading {args.events:,} events", file=sys.stderr)
        loaded = load(url, gen, total=args.events)
        print(f"loaded: {loaded}", file=sys.stderr)
        deadline()
        busy = {"before_pages": os.getloadavg()}
        print("first pages", file=sys.stderr)
        pages = measure_pages(
            url,
            pop,
            secret=secret,
            rounds=args.rounds,
            per_kind=args.per_kind,
            seed=args.seed,
            deadline=deadline,
        )
        events = args.events
        exports = {}
        for fmt in ("csv",) if args.no_ndjson else ("csv", "ndjson"):
            deadline()
            print(f"export {fmt}", file=sys.stderr)
            busy[f"before_export_{fmt}"] = os.getloadavg()
            exports[fmt] = measure_export(url, events=events, fmt=fmt, runs=args.runs, timeout=remaining)
        deadline()
        print("verify", file=sys.stderr)
        busy["before_verify"] = os.getloadavg()
        verified = measure_verify(url, events=events, runs=args.runs, timeout=remaining)
        report: dict[str, Any] = {
            "command": " ".join([".venv/bin/python", "bench/audit_scale.py", *sys.argv[1:]]),
            "events": events,
            "machine": {**machine(url), "load_average_1_5_15_min": busy},
            "load": loaded,
            "pages": pages,
            "export": exports,
            "verify": verified,
            "elapsed_s": round(time.monotonic() - began, 1),
        }
        report["verdicts"] = verdicts(report)
    finally:
        signal.alarm(0)
        if args.keep:
            print(f"kept {url}", file=sys.stderr)
        else:
            drop_database(admin_url, url)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "audit_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / "audit_scale.md").write_text(markdown(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
