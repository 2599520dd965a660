"""Access reports for auditors: who could reach a database at a moment, and every grant over a period.

Built from the requests (kept forever after they end), their approvals and rules, not from the audit log.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from app.models import AccessRequest, RequestStatus, Role
from app.services.databases import get_database
from app.services.identity import Principal

# A grant is a request that became active. Its window is the half-open [activated_at, end): `end` is
# `ended_at` once the request ended after activation (expired, revoked, failed), since that is when
# Drawbridge stopped granting it; while it is still active, `end` is its current `expires_at`, which
# already includes every extension (activation sets both, so the end is never NULL). Access at Heroku
# lasts until the rule is deleted: a moment later, or longer when another request shares the rule, so each
# row also carries the rule's own window.
_GRANT_END: ColumnElement[Any] = func.coalesce(AccessRequest.ended_at, AccessRequest.expires_at)


@dataclass(frozen=True)
class Grant:
    """One request that became active, as an auditor reads it."""

    request_id: uuid.UUID
    cidr: str
    requester: str
    filed_by: str | None
    reason: str
    approvers: tuple[str, ...]
    """Who approved the request itself (round 0); empty when a policy approved it."""
    approved_by_policy: bool
    extension_approvers: tuple[str, ...]
    """Who approved its extensions (rounds 1, 2, …), in order; self-extensions need no one."""
    granted_from: datetime
    granted_until: datetime | None
    """When the grant ended; None while the request is still live."""
    expires_at: datetime | None
    """The scheduled end, after extensions."""
    status: RequestStatus
    rule_authorized_at: datetime | None
    rule_deleted_at: datetime | None


def who_could_reach(session: Session, *, principal: Principal, database: str, at: datetime) -> list[Grant]:
    """Every grant on `database` whose window contains `at`: one that started exactly at `at` counts, one
    that ended exactly at `at` does not. Ordered by start, then CIDR. Reads only; commits nothing.

    Raises PermissionDenied unless the principal is an auditor or admin, DatabaseNotFound for an unknown
    database.
    """
    conditions = (
        AccessRequest.activated_at <= at,
        _GRANT_END > at,
    )
    return _grants(session, principal=principal, database=database, conditions=conditions)


def grants_between(
    session: Session, *, principal: Principal, database: str, start: datetime, end: datetime
) -> list[Grant]:
    """Every grant on `database` whose window overlaps the half-open [start, end). Ordered by start, then
    CIDR. Reads only; commits nothing.

    Raises PermissionDenied unless the principal is an auditor or admin, DatabaseNotFound for an unknown
    database.
    """
    conditions = (
        AccessRequest.activated_at < end,
        _GRANT_END > start,
    )
    return _grants(session, principal=principal, database=database, conditions=conditions)


def _grants(
    session: Session, *, principal: Principal, database: str, conditions: Sequence[ColumnElement[bool]]
) -> list[Grant]:
    principal.require(Role.AUDITOR, Role.ADMIN)
    db = get_database(session, name=database)
    # Every condition compares activated_at, so requests that never became active (NULL) never match.
    query = select(AccessRequest).where(AccessRequest.database_id == db.id, *conditions)
    found = [_grant(request) for request in session.scalars(query)]
    # CIDRs sort as networks (9.0.0.0/8 before 10.0.0.0/8), which neither database does for text.
    found.sort(key=lambda g: (g.granted_from, ipaddress.ip_network(g.cidr), str(g.request_id)))
    return found


def _grant(request: AccessRequest) -> Grant:
    assert request.activated_at is not None  # selected for it
    approvers = tuple(a.approver.name for a in request.approvals if a.round == 0)
    rule = request.ip_rule
    return Grant(
        request_id=request.id,
        cidr=request.cidr,
        requester=request.requester.name,
        filed_by=request.filed_by.name if request.filed_by else None,
        reason=request.reason,
        approvers=approvers,
        # Only an auto-approval rule activates a request without a single round-0 approval.
        approved_by_policy=not approvers,
        extension_approvers=tuple(a.approver.name for a in request.approvals if a.round > 0),
        granted_from=request.activated_at,
        granted_until=request.ended_at,
        expires_at=request.expires_at,
        status=request.status,
        rule_authorized_at=rule.authorized_at if rule else None,
        rule_deleted_at=rule.deleted_at if rule else None,
    )
