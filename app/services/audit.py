"""The audit log: writing events inside the caller's transaction, and reading them back for auditors."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.models import AccessRequest, AuditEvent, Role
from app.services.errors import InvalidRequest
from app.services.identity import Principal


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
    """Add one audit event to `session`; the caller commits it together with the change it records."""
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
    session.add(event)
    return event


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
    """One page of events in the order they were written, starting after `cursor`."""
    require_auditor(principal)
    query = filters.apply(select(AuditEvent)).order_by(AuditEvent.id).limit(limit + 1)
    if cursor is not None:
        query = query.where(AuditEvent.id > decode_cursor(cursor))
    rows = list(session.scalars(query))
    more = len(rows) > limit
    items = rows[:limit]
    return Page(items=items, next_cursor=encode_cursor(items[-1].id) if more and items else None)


def iter_events(
    session: Session, *, principal: Principal, filters: EventFilter, batch: int = 1000
) -> Iterator[AuditEvent]:
    """Every matching event, in order, fetched in keyset batches so memory stays flat."""
    require_auditor(principal)
    after = 0
    while True:
        query = (
            filters.apply(select(AuditEvent))
            .where(AuditEvent.id > after)
            .order_by(AuditEvent.id)
            .limit(batch)
        )
        rows = list(session.scalars(query))
        if not rows:
            return
        yield from rows
        after = rows[-1].id
        session.expunge_all()
