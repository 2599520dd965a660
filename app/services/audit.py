"""The audit log: writing events inside the caller's transaction, and reading them back for auditors."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select, text
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from app.models import AccessRequest, AuditEvent, Role
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


def canonical(event: AuditEvent) -> bytes:
    """The bytes an event's hash covers (with the previous hash): every field but the row id."""
    content = {
        "seq": event.seq,
        "occurred_at": event.occurred_at.astimezone(UTC).isoformat(),
        "actor": event.actor,
        "on_behalf_of": event.on_behalf_of,
        "source": event.source,
        "action": event.action,
        "request_id": str(event.request_id) if event.request_id is not None else None,
        "database": event.database,
        "details": event.details,
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link(previous: str, event: AuditEvent) -> str:
    return hashlib.sha256(previous.encode() + b"\n" + canonical(event)).hexdigest()


@sa_event.listens_for(Session, "before_commit")
def _append_pending(session: Session) -> None:
    """Append the transaction's events to the chain, last thing before COMMIT.

    On PostgreSQL writers take turns through a transaction-level advisory lock, held until the commit, so
    `seq` order is commit order (keyset pages by seq never miss a late commit). Taking the lock only now,
    after every row lock the transaction needs, means it cannot deadlock with them. SQLite has one writer.
    """
    pending: list[AuditEvent] = session.info.pop(_PENDING, [])
    if not pending:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CHAIN_LOCK})
    last = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, previous = (last[0], last[1]) if last is not None else (0, GENESIS)
    for event in pending:
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


@dataclass(frozen=True)
class Verification:
    ok: bool
    count: int
    head: dict[str, Any] | None
    first_broken: dict[str, Any] | None


def verify(session: Session, *, batch: int = 5000) -> Verification:
    """Walk the whole chain in `seq` order and report the first link that does not hold: a row whose
    content was edited, a row deleted (a gap) or rows swapped (their links no longer meet)."""
    previous, expected_seq, count = GENESIS, 1, 0
    last: AuditEvent | None = None
    after = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.seq > after).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            break
        for event in rows:
            problem = None
            if event.seq != expected_seq:
                problem = f"expected event {expected_seq} here but found {event.seq}: events are missing"
            elif event.prev_hash != previous:
                problem = "its link to the previous event does not match: events were removed or reordered"
            elif link(previous, event) != event.hash:
                problem = "its content does not match its hash: the event was altered"
            if problem is not None:
                return Verification(
                    ok=False,
                    count=count,
                    head=_head(last),
                    first_broken={"seq": event.seq, "id": event.id, "problem": problem},
                )
            previous, expected_seq, count, last = event.hash, event.seq + 1, count + 1, event
        after = rows[-1].seq
        session.expunge_all()
    return Verification(ok=True, count=count, head=_head(last), first_broken=None)


def _head(event: AuditEvent | None) -> dict[str, Any] | None:
    if event is None:
        return None
    return {"seq": event.seq, "hash": event.hash, "occurred_at": event.occurred_at.isoformat()}


@dataclass(frozen=True)
class EventFilter:
    request_id: uuid.UUID | None = None
    actor: str | None = None
    on_behalf_of: str | None = None
    database: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, query: Select[AuditEvent]) -> Select[AuditEvent]:
        if self.request_id is not None:
            query = query.where(AuditEvent.request_id == self.request_id)
        if self.actor is not None:
            query = query.where(AuditEvent.actor == self.actor)
        if self.on_behalf_of is not None:
            query = query.where(AuditEvent.on_behalf_of == self.on_behalf_of)
        if self.database is not None:
            query = query.where(AuditEvent.database == self.database)
        if self.action is not None:
            query = query.where(AuditEvent.action == self.action)
        if self.since is not None:
            query = query.where(AuditEvent.occurred_at >= self.since)
        if self.until is not None:
            query = query.where(AuditEvent.occurred_at < self.until)
        return query


@dataclass(frozen=True)
class Page:
    items: Sequence[AuditEvent]
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
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
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
    query = filters.apply(select(AuditEvent)).order_by(AuditEvent.seq).limit(limit + 1)
    if cursor is not None:
        query = query.where(AuditEvent.seq > decode_cursor(cursor))
    rows = list(session.scalars(query))
    more = len(rows) > limit
    items = rows[:limit]
    return Page(items=items, next_cursor=encode_cursor(items[-1].seq) if more and items else None)
