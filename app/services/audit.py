"""The audit log: writing events inside the caller's transaction, and reading them back for auditors."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import queue
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import orjson
from sqlalchemy import (
    ColumnElement,
    Row,
    ScalarSelect,
    Select,
    Text,
    case,
    cast,
    false,
    func,
    literal,
    null,
    select,
    text,
    type_coerce,
)
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from app.models import AccessRequest, AuditEvent, AuditMark, Role
from app.services.errors import InvalidRequest
from app.services.identity import Principal

GENESIS = "0" * 64
_PENDING = "drawbridge_audit_pending"
_CHAIN_LOCK = 7_240_417  # the advisory lock that makes appends to the chain take turns


def record(
    session: Session,
    *,
    principal: Principal,
    action: str,
    at: datetime,
    request: AccessRequest | None = None,
    database: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add one audit event to the caller's transaction; it is appended to the chain when that
    transaction commits, together with the change it records (and vanishes with it on rollback)."""
    event = AuditEvent(
        occurred_at=at,
        actor=principal.actor,
        on_behalf_of=principal.on_behalf_of,
        source=principal.source,
        action=action,
        request_id=request.id if request is not None else None,
        database=database if database is not None else (request.database.name if request else None),
        details=details or {},
    )
    session.info.setdefault(_PENDING, []).append(event)
    return event


class EventFields(Protocol):
    """What the chain covers: an `AuditEvent` or a plain row of its columns."""

    seq: int
    occurred_at: datetime
    actor: str
    on_behalf_of: str | None
    source: str
    action: str
    request_id: uuid.UUID | None
    database: str | None
    details: dict[str, Any]


COLUMNS = (
    "seq",
    "id",
    "occurred_at",
    "actor",
    "on_behalf_of",
    "source",
    "action",
    "request_id",
    "database",
    "details",
    "prev_hash",
    "hash",
)
"""An event's columns in the order pages and exports give them."""
CHAIN_COLUMNS = tuple(getattr(AuditEvent, name) for name in COLUMNS)

Plain = tuple[int, int, str, str, str | None, str, str, str | None, str | None, str, str, str]
"""An event as plain text, in `COLUMNS` order: the time in ISO 8601 UTC, the request id as text, the
details as canonical JSON (sorted keys, no spaces). Exports write these, and the hash covers them."""

_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_json_string = json.JSONEncoder(ensure_ascii=False).encode
_decode = json.JSONDecoder().decode
# A number orjson would write differently from json.dumps: a float (orjson writes 1e-5 where json.dumps
# writes 1e-05) or an integer beyond 64 bits (orjson reads it as a float). The pattern looks for number
# tokens as PostgreSQL writes jsonb; text inside strings may match too, which only costs the slow path.
_NUMBER_NEEDING_CARE = re.compile(r"[:\[,] ?-?\d(?:\d*[.eE]|\d{18})")
_CANONICAL = (
    '{{"action":{},"actor":{},"database":{},"details":{},"occurred_at":{},"on_behalf_of":{},'
    '"request_id":{},"seq":{},"source":{}}}'
)
T = TypeVar("T")


def canonical_details(jsonb_text: str) -> str:
    """PostgreSQL's text of a jsonb value as canonical JSON (the same text `json.dumps(sort_keys=True)`
    gives), through orjson when no number in it could be written differently, else through json."""
    if _NUMBER_NEEDING_CARE.search(jsonb_text) is None:
        return orjson.dumps(orjson.loads(jsonb_text), option=orjson.OPT_SORT_KEYS).decode()
    return _canonical_json(_decode(jsonb_text))


def _nullable(text: str | None) -> str:
    return "null" if text is None else _json_string(text)


def canonical_text(event: Plain) -> str:
    """What an event's hash covers (with the previous hash): every field but the row id and the hashes,
    as one JSON object with sorted keys and no spaces. Written out rather than built with json.dumps so
    that verifying needs no dict per event; it is the same text (a test holds the two equal)."""
    seq, _id, at, actor, obo, source, action, rid, db, details, _prev, _hash = event
    return _CANONICAL.format(
        _json_string(action),
        _json_string(actor),
        _nullable(db),
        details,
        _json_string(at),
        _nullable(obo),
        _nullable(rid),
        seq,
        _json_string(source),
    )


def plain(event: EventFields) -> Plain:
    """An event (ORM object or row) as a `Plain` tuple; id and hashes are 0 and "" when not yet set."""
    return (
        event.seq,
        getattr(event, "id", None) or 0,
        event.occurred_at.astimezone(UTC).isoformat(),
        event.actor,
        event.on_behalf_of,
        event.source,
        event.action,
        str(event.request_id) if event.request_id is not None else None,
        event.database,
        _canonical_json(event.details),
        getattr(event, "prev_hash", None) or "",
        getattr(event, "hash", None) or "",
    )


def canonical(event: EventFields) -> bytes:
    """The bytes an event's hash covers (with the previous hash): see `canonical_text`."""
    return canonical_text(plain(event)).encode()


def link(previous: str, event: EventFields) -> str:
    return _link_plain(previous, plain(event))


def _link_plain(previous: str, event: Plain) -> str:
    """SHA-256 over the previous event's hash, a newline and the event's canonical text."""
    return hashlib.sha256((previous + "\n" + canonical_text(event)).encode()).hexdigest()


@sa_event.listens_for(Session, "before_commit")
def _append_pending(session: Session) -> None:
    """Append the transaction's events to the chain, last thing before COMMIT.

    On PostgreSQL writers take turns through a transaction-level advisory lock, held until the commit, so
    `seq` order is commit order (keyset pages by seq never miss a late commit). Taking the lock only now,
    after every row lock the transaction needs, means it cannot deadlock with them. SQLite has one writer.

    An event is never dated before the latest event already chained: a writer that read the clock just
    before another one committed is moved forward by that gap (milliseconds), so `seq` order is also time
    order and a time window becomes a range of `seq` (see `EventFilter`).
    """
    pending: list[AuditEvent] = session.info.pop(_PENDING, [])
    if not pending:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CHAIN_LOCK})
    # The chain's last link and its latest time in one round trip: this runs in every writing commit.
    last = session.execute(
        select(
            AuditEvent.seq,
            AuditEvent.hash,
            select(func.max(AuditEvent.occurred_at)).scalar_subquery(),
        )
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    seq, previous, latest = (last[0], last[1], last[2]) if last is not None else (0, GENESIS, None)
    for event in pending:
        if latest is not None and event.occurred_at < latest:
            event.occurred_at = latest
        latest = event.occurred_at
        seq += 1
        event.seq = seq
        event.prev_hash = previous
        event.hash = link(previous, event)
        previous = event.hash
        session.add(event)
    session.flush()


@sa_event.listens_for(Session, "after_soft_rollback")
def _drop_pending(session: Session, _previous_transaction: Any) -> None:
    session.info.pop(_PENDING, None)


def batches(session: Session, filters: EventFilter, *, size: int = 5000) -> Iterator[list[Plain]]:
    """Matching events in chain order as lists of `Plain` tuples, read through a server-side cursor.

    On PostgreSQL the database renders times, ids and details as text, which spares building a datetime,
    a UUID and a dict per event (most of an export's time); elsewhere the values are converted here. Both
    give the same text (a test compares them byte for byte)."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        utc = AuditEvent.occurred_at.op("AT TIME ZONE")(literal("UTC"))
        micro = type_coerce(func.to_char(utc, "US"), Text)
        # datetime.isoformat's text: microseconds only when there are some, then the UTC offset.
        at = type_coerce(func.to_char(utc, 'YYYY-MM-DD"T"HH24:MI:SS'), Text) + case(
            (micro == "000000", ""), else_="." + micro
        )
        columns: list[Any] = list(CHAIN_COLUMNS)
        columns[COLUMNS.index("occurred_at")] = at + "+00:00"
        columns[COLUMNS.index("request_id")] = cast(AuditEvent.request_id, Text)
        columns[COLUMNS.index("details")] = cast(AuditEvent.details, Text)
        query = filters.apply(select(*columns), session).order_by(AuditEvent.seq)
        compiled = query.compile(dialect=connection.dialect)
        # psycopg's own server-side cursor, inside the session's transaction: plain tuples, without a
        # Row object per event.
        driver = connection.connection.driver_connection
        assert driver is not None
        with driver.cursor(name=f"audit_{uuid.uuid4().hex}") as cursor:
            cursor.execute(str(compiled), compiled.params)
            for part in _read_ahead(iter(lambda: cursor.fetchmany(size), [])):
                yield [
                    (seq, id_, at, actor, obo, src, act, rid, db, canonical_details(d), p, h)
                    for seq, id_, at, actor, obo, src, act, rid, db, d, p, h in part
                ]
        return
    query = filters.apply(select(*CHAIN_COLUMNS), session).order_by(AuditEvent.seq)
    for part in connection.execute(query.execution_options(yield_per=size)).partitions(size):
        yield [plain(row) for row in part]


def _read_ahead(parts: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield what `parts` yields, read by a thread up to `depth` items ahead, so that fetching the next
    batch (PostgreSQL's work, and the wait for it) overlaps formatting this one (Python's work).

    Only the thread touches the cursor while it runs; closing this generator stops and joins it."""
    ahead: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            for part in parts:
                while not stop.is_set():
                    try:
                        ahead.put(("part", part), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ahead.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            ahead.put(("error", exc))

    reader = threading.Thread(target=pump, name="audit-export-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            kind, item = ahead.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():
            try:
                ahead.get(timeout=0.1)
            except queue.Empty:
                pass
        reader.join()


@dataclass(frozen=True)
class Verification:
    ok: bool
    count: int
    head: dict[str, Any] | None
    first_broken: dict[str, Any] | None


def verify(session: Session) -> Verification:
    """Walk the whole chain in `seq` order and report the first link that does not hold: a row whose
    content was edited, a row deleted (a gap) or rows swapped (their links no longer meet).

    Events come as `Plain` tuples in batches through a server-side cursor, so memory stays flat."""
    previous, expected_seq, count = GENESIS, 1, 0
    last: Plain | None = None
    for batch in batches(session, EventFilter()):
        for event in batch:
            seq, id_, _at, *_rest, prev_hash, digest = event
            problem = None
            if seq != expected_seq:
                problem = f"expected event {expected_seq} here but found {seq}: events are missing"
            elif prev_hash != previous:
                problem = "its link to the previous event does not match: events were removed or reordered"
            elif _link_plain(previous, event) != digest:
                problem = "its content does not match its hash: the event was altered"
            if problem is not None:
                return Verification(
                    ok=False,
                    count=count,
                    head=_head(last),
                    first_broken={"seq": seq, "id": id_, "problem": problem},
                )
            previous, expected_seq, count, last = digest, seq + 1, count + 1, event
    return Verification(ok=True, count=count, head=_head(last), first_broken=None)


def _head(event: Plain | None) -> dict[str, Any] | None:
    if event is None:
        return None
    return {"seq": event[0], "hash": event[-1], "occurred_at": event[2]}


@dataclass(frozen=True)
class EventFilter:
    request_id: uuid.UUID | None = None
    actor: str | None = None
    on_behalf_of: str | None = None
    database: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, query: Select[Any], session: Session) -> Select[Any]:
        """Narrow `query` (over audit_events) to the selection."""
        return query.where(*self.conditions(session))

    def conditions(self, session: Session) -> list[ColumnElement[bool]]:
        """The WHERE conditions of the selection. A time window is turned into a `seq` range where the
        chain is in time order (see `AuditMark`), so every filter combines with a time window on one
        (column, seq) index; older rows, which may be out of time order, are compared by time."""
        where: list[ColumnElement[bool]] = []
        if self.request_id is not None:
            where.append(AuditEvent.request_id == self.request_id)
        if self.actor is not None:
            where.append(AuditEvent.actor == self.actor)
        if self.on_behalf_of is not None:
            where.append(AuditEvent.on_behalf_of == self.on_behalf_of)
        if self.database is not None:
            where.append(AuditEvent.database == self.database)
        if self.action is not None:
            where.append(AuditEvent.action == self.action)
        if self.since is None and self.until is None:
            return where
        # One round trip for the three index lookups.
        ordered_from, first_since, first_until = session.execute(
            select(
                select(AuditMark.seq).where(AuditMark.name == AuditMark.TIME_ORDERED_FROM).scalar_subquery(),
                _first_seq_from(self.since),
                _first_seq_from(self.until),
            )
        ).one()
        if self.since is not None:
            if first_since is None:
                where.append(false())
            elif ordered_from is not None and first_since >= ordered_from:
                where.append(AuditEvent.seq >= first_since)
            else:
                where.append(AuditEvent.occurred_at >= self.since)
        if self.until is not None and first_until is not None:
            if ordered_from is not None and first_until >= ordered_from:
                where.append(AuditEvent.seq < first_until)
            else:
                where.append(AuditEvent.occurred_at < self.until)
        return where


def _first_seq_from(moment: datetime | None) -> ScalarSelect[Any]:
    """The `seq` of the earliest event at or after `moment` (an index lookup on (occurred_at, seq)), or
    NULL when there is none or no moment.

    From the time-ordered mark on, each event is at least as late as every event before it, so when this
    event lies past the mark, every event before it is earlier than `moment` and every one after is not."""
    if moment is None:
        return select(null()).scalar_subquery()
    return (
        select(AuditEvent.seq)
        .where(AuditEvent.occurred_at >= moment)
        .order_by(AuditEvent.occurred_at, AuditEvent.seq)
        .limit(1)
        .scalar_subquery()
    )


@dataclass(frozen=True)
class Page:
    items: Sequence[Row[Any]]
    next_cursor: str | None


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": last_id}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Return the id after which the page starts; raise InvalidRequest for a cursor we did not issue."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        after = json.loads(raw)["after"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidRequest("the cursor is not one this API returned", field="cursor") from None
    # seq is a PostgreSQL bigint: a larger number cannot be one we issued, and would not bind.
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**63:
        raise InvalidRequest("the cursor is not one this API returned", field="cursor")
    return after


def require_auditor(principal: Principal) -> None:
    """Raise PermissionDenied unless the principal may read the audit log."""
    principal.require(Role.AUDITOR, Role.ADMIN)


def list_events(
    session: Session,
    *,
    principal: Principal,
    filters: EventFilter,
    cursor: str | None,
    limit: int,
) -> Page:
    """One page of events in chain order, starting after `cursor`. Because `seq` is assigned in commit
    order, events committed while an auditor pages through appear on later pages, never skipped."""
    require_auditor(principal)
    query = filters.apply(select(*CHAIN_COLUMNS), session).order_by(AuditEvent.seq).limit(limit + 1)
    if cursor is not None:
        query = query.where(AuditEvent.seq > decode_cursor(cursor))
    rows = list(session.execute(query))
    more = len(rows) > limit
    items = rows[:limit]
    return Page(items=items, next_cursor=encode_cursor(items[-1].seq) if more and items else None)
