"""Time windows over the audit log are answered as `seq` ranges: the chain is kept in time order from the
mark migration 0005 writes, and rows chained before it, out of time order, are still compared by time."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.cli import alembic_config
from app.db import make_engine
from app.models import AuditEvent, AuditMark, Role
from app.services import audit, export
from app.services.identity import Principal
from tests.conftest import _postgres_or_skip, create_scratch_database, drop_scratch_database

T0 = datetime(2026, 3, 1, tzinfo=UTC)
AUDRA = Principal(user_id=1, name="audra", roles=frozenset({Role.AUDITOR}))
ACTORS = ("alice", "bob", "carol")
ACTIONS = ("access_request:create", "access_request:approve", "ip_rule:delete")


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    if request.param == "postgresql":
        _postgres_or_skip()
        scratch = create_scratch_database("drawbridge_time_order")
        yield scratch
        drop_scratch_database(scratch)
    else:
        yield f"sqlite:///{tmp_path}/time_order.db"


def chain_by_hand(engine: Engine, times: list[datetime], rng: random.Random) -> None:
    """Rows chained the way revision 0004 left them: valid links, times in whatever order they came."""
    with Session(engine) as session, session.begin():
        previous = audit.GENESIS
        for seq, moment in enumerate(times, start=1):
            event = AuditEvent(
                seq=seq,
                occurred_at=moment,
                actor=rng.choice(ACTORS),
                on_behalf_of=None,
                source="api",
                action=rng.choice(ACTIONS),
                request_id=None,
                database="main",
                details={"n": seq},
            )
            event.prev_hash, event.hash = previous, audit.link(previous, event)
            previous = event.hash
            session.add(event)


def record(engine: Engine, moment: datetime, rng: random.Random) -> None:
    actor = rng.choice(ACTORS)
    principal = Principal(user_id=2, name=actor, roles=frozenset({Role.REQUESTER}))
    with Session(engine) as session, session.begin():
        audit.record(session, principal=principal, action=rng.choice(ACTIONS), at=moment, database="main")


def by_plain_time(engine: Engine, since: datetime | None, until: datetime | None, **equal: str) -> list[int]:
    query = select(AuditEvent.seq).order_by(AuditEvent.seq)
    if since is not None:
        query = query.where(AuditEvent.occurred_at >= since)
    if until is not None:
        query = query.where(AuditEvent.occurred_at < until)
    for column, value in equal.items():
        query = query.where(getattr(AuditEvent, column) == value)
    with Session(engine) as session:
        return list(session.scalars(query))


def listed(engine: Engine, filters: audit.EventFilter) -> list[int]:
    with Session(engine) as session:
        page = audit.list_events(session, principal=AUDRA, filters=filters, cursor=None, limit=10_000)
        seqs = [row.seq for row in page.items]
        assert export.count(session, filters) == len(seqs)
        assert [event[0] for event in export.rows(session, filters)] == seqs
        return seqs


def test_an_event_stamped_before_the_latest_one_is_dated_at_the_latest(url: str) -> None:
    command.upgrade(alembic_config(url), "head")
    engine = make_engine(url)
    rng = random.Random(1)
    try:
        record(engine, T0 + timedelta(minutes=5), rng)
        record(engine, T0 + timedelta(minutes=2), rng)  # a writer whose clock was read before the commit
        record(engine, T0 + timedelta(minutes=9), rng)
        with Session(engine) as session:
            times = list(session.scalars(select(AuditEvent.occurred_at).order_by(AuditEvent.seq)))
            assert times == [T0 + timedelta(minutes=m) for m in (5, 5, 9)]
            assert audit.verify(session).ok
    finally:
        engine.dispose()


def test_migration_marks_where_time_order_begins(url: str) -> None:
    config = alembic_config(url)
    command.upgrade(config, "0004")
    engine = make_engine(url)
    try:
        minutes = [0, 10, 5, 20, 30, 25, 40, 50]  # seq 3 and 6 are earlier than an event before them
        chain_by_hand(engine, [T0 + timedelta(minutes=m) for m in minutes], random.Random(2))
        command.upgrade(config, "head")
        with Session(engine) as session:
            assert session.get(AuditMark, AuditMark.TIME_ORDERED_FROM).seq == 7  # type: ignore[union-attr]
        command.downgrade(config, "0004")
        with create_engine(url).connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM audit_events")).scalar() == len(minutes)
    finally:
        engine.dispose()


def test_time_windows_select_exactly_what_a_time_comparison_selects(url: str) -> None:
    """Old rows out of order below the mark, ordered ones above it, ties, late writers clamped forward:
    for random windows and filters, the seq-range answer equals the plain time comparison."""
    config = alembic_config(url)
    command.upgrade(config, "0004")
    engine = make_engine(url)
    rng = random.Random(5)
    try:
        old = [T0 + timedelta(minutes=rng.randrange(0, 600)) for _ in range(60)]
        chain_by_hand(engine, old, rng)
        command.upgrade(config, "head")
        moment = T0 + timedelta(minutes=300)
        for _ in range(120):
            moment += timedelta(minutes=rng.choice([0, 0, 1, 3, 7]))  # ties too
            late = rng.random() < 0.15  # a writer whose time was read long before it committed
            record(engine, moment - timedelta(minutes=30) if late else moment, rng)
        with Session(engine) as session:
            mark = session.get(AuditMark, AuditMark.TIME_ORDERED_FROM)
            assert mark is not None and 1 < mark.seq <= 61
        edges = [None, *[T0 + timedelta(minutes=m) for m in range(-10, 1200, 7)]]
        for _ in range(150):
            since, until = rng.choice(edges), rng.choice(edges)
            equal = rng.choice([{}, {"actor": rng.choice(ACTORS)}, {"action": rng.choice(ACTIONS)}])
            expected = by_plain_time(engine, since, until, **equal)
            assert listed(engine, audit.EventFilter(since=since, until=until, **equal)) == expected
    finally:
        engine.dispose()


def test_a_window_past_the_mark_is_a_seq_range(url: str) -> None:
    command.upgrade(alembic_config(url), "head")
    engine = make_engine(url)
    rng = random.Random(7)
    try:
        for minute in range(20):
            record(engine, T0 + timedelta(minutes=minute), rng)
        window = audit.EventFilter(since=T0 + timedelta(minutes=5), until=T0 + timedelta(minutes=9))
        with Session(engine) as session:
            sql = str(window.apply(select(AuditEvent.seq), session).compile(engine))
        assert "occurred_at" not in sql and "seq >=" in sql and "seq <" in sql
        assert listed(engine, window) == [6, 7, 8, 9]
    finally:
        engine.dispose()


def test_postgresql_and_sqlite_export_the_same_bytes(tmp_path: object) -> None:
    """PostgreSQL renders times, ids and details itself; the result must be what SQLite's path writes."""
    _postgres_or_skip()
    pg_url = create_scratch_database("drawbridge_export_bytes")
    outputs: dict[str, dict[str, str]] = {}
    try:
        for url in (pg_url, f"sqlite:///{tmp_path}/export_bytes.db"):
            command.upgrade(alembic_config(url), "head")
            engine = make_engine(url)
            try:
                with Session(engine) as session, session.begin():
                    previous = audit.GENESIS
                    for seq in range(1, 7):
                        event = AuditEvent(
                            seq=seq,
                            occurred_at=T0 + timedelta(seconds=seq, microseconds=0 if seq % 2 else 1500),
                            actor=["alice", "=SUM(A1)", "-bob", "@carol", "zoë", "+x"][seq - 1],
                            on_behalf_of=None if seq % 3 else "dave",
                            source="api",
                            action="access_request:create",
                            request_id=uuid.UUID(int=seq * 7919) if seq % 2 else None,
                            database="main" if seq != 4 else None,
                            details=[
                                {"zeta": [3, {"b": 1, "a": 'é\n"q"'}], "alpha": None, "mid": True},
                                {"ratio": 0.5, "tiny": 1e-05, "note": "x: 1.5, [2.5]"},
                                {},
                                {"big": 2**70, "neg": -(2**63)},
                                {"list": [1.25, -0.5]},
                                {"k": "v"},
                            ][seq - 1],
                        )
                        event.prev_hash, event.hash = previous, audit.link(previous, event)
                        previous = event.hash
                        session.add(event)
                with Session(engine) as session:
                    outputs[engine.dialect.name] = {
                        fmt: "".join(export.chunks(session, fmt=fmt, filters=audit.EventFilter()))
                        for fmt in ("csv", "ndjson")
                    }
            finally:
                engine.dispose()
    finally:
        drop_scratch_database(pg_url)
    assert outputs["postgresql"] == outputs["sqlite"]
    lines = outputs["postgresql"]["ndjson"].splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 7))
    assert '"details":{"alpha":null,"mid":true,"zeta":[3,{"a":"é\\n\\"q\\"","b":1}]}' in lines[0]
    assert '"details":{"note":"x: 1.5, [2.5]","ratio":0.5,"tiny":1e-05}' in lines[1]
    assert '"details":{"big":1180591620717411303424,"neg":-9223372036854775808}' in lines[3]
    assert "'=SUM(A1)" in outputs["postgresql"]["csv"] and "'-bob" in outputs["postgresql"]["csv"]


def test_an_export_abandoned_midway_stops_its_read_ahead_and_frees_the_connection() -> None:
    """A client that hangs up mid-download closes the generator: the reading thread must stop, and the
    session's connection must be usable again (it goes back to the pool)."""
    _postgres_or_skip()
    url = create_scratch_database("drawbridge_read_ahead")
    try:
        command.upgrade(alembic_config(url), "head")
        engine = make_engine(url)
        rng = random.Random(3)
        try:
            for minute in range(30):
                record(engine, T0 + timedelta(minutes=minute), rng)
            with Session(engine) as session:
                parts = audit.batches(session, audit.EventFilter(), size=4)
                first = next(parts)
                assert [event[0] for event in first] == [1, 2, 3, 4]
                parts.close()
                assert not [t for t in threading.enumerate() if t.name == "audit-export-read-ahead"]
                assert session.scalar(select(func.count()).select_from(AuditEvent)) == 30
                whole = [
                    event[0]
                    for batch in audit.batches(session, audit.EventFilter(), size=4)
                    for event in batch
                ]
                assert whole == list(range(1, 31))
        finally:
            engine.dispose()
    finally:
        drop_scratch_database(url)
