"""Notifications: events are written to an outbox in the transaction of the change they announce, and the
sweep step that warns before access ends; `app.notifier` delivers the outbox (Slack, signed webhooks) with
retries, so a slow or dead receiver never blocks or breaks a request and no notification is lost.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.clock import Clock
from app.models import AccessRequest, Database, Notification, RequestStatus

if TYPE_CHECKING:
    from app.services.grants import Report, Settings

EVENTS = (
    "request_created",  # a request waits for approvers (Slack: with Approve and Deny buttons)
    "request_decided",  # approved (by people or by policy) or denied
    "request_ended",  # cancelled or timed out before access was granted
    "access_ready",  # the rule is authorized; access works
    "access_ending",  # access ends soon; how to extend
    "access_ended",  # expired, revoked or failed
    "extension_requested",  # an extension waits for approvers
    "extension_decided",  # an extension was approved or denied
)


def request_view(request: AccessRequest) -> dict[str, Any]:
    """What receivers learn of a request: enough to act, nothing secret."""
    return {
        "id": str(request.id),
        "database": request.database.name,
        "cidr": request.cidr,
        "requester": request.requester.name,
        "filed_by": request.filed_by.name if request.filed_by else None,
        "reason": request.reason,
        "duration": request.duration,
        "status": request.status.value,
        "approvals": len([a for a in request.approvals if a.round == request.approval_round]),
        "approvals_required": request.database.approvals_required,
        "activated_at": request.activated_at.isoformat() if request.activated_at else None,
        "expires_at": request.expires_at.isoformat() if request.expires_at else None,
        "end_reason": request.end_reason,
        "pending_extension": request.pending_extension,
    }


def enqueue(
    session: Session,
    *,
    event: str,
    request: AccessRequest,
    at: datetime,
    actor: str | None = None,
    **extra: Any,
) -> Notification:
    """Add one notification to `session`; the caller commits it with the change it announces."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r}")
    session.flush()
    session.refresh(request)
    notification = Notification(
        event=event,
        request_id=request.id,
        payload={
            "event": event,
            "occurred_at": at.isoformat(),
            "actor": actor,
            "request": request_view(request),
            **extra,
        },
        created_at=at,
        delivered_to=[],
        attempts=0,
    )
    session.add(notification)
    return notification


def shorthand(seconds: int) -> str:
    """A duration as the shorthand the API and the Slack command accept (`90m`, `2h`, `1d`), rounded down
    to whole minutes so a suggestion never asks for more than it may."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds // 60}m" if seconds >= 60 else f"{seconds}s"


def how_to_extend(request: AccessRequest) -> dict[str, Any]:
    """How the holder of `request` extends it, by API and by Slack, with a duration the policy allows:
    `room` is what may still be added in total, `without_approval` what of it needs no new approval."""
    db = request.database
    room = max(0, db.max_duration - request.duration)
    left = min(room, max(0, db.self_extension - request.self_extended))
    if room == 0:
        return {"room": 0, "without_approval": 0}
    suggested = shorthand(min(left or db.default_duration, room))
    return {
        "api": f"POST /access-requests/{request.id}/extend",
        "body": {"duration": suggested},
        "slack": f"/drawbridge extend {request.id} {suggested}",
        "room": room,
        "without_approval": left,
    }


def warn_before_end(
    sessions: sessionmaker[Session], *, clock: Clock, settings: Settings, report: Report
) -> None:
    """Warn the holder of each active request whose end is within its database's `warn_before`, once:
    `warned_at` is set by compare-and-set on a row locked with SKIP LOCKED, and committed together with
    the `access_ending` notification (no audit event: the status does not change; `warned_at` and the
    outbox row are the record). An extension clears `warned_at`, so the warning comes again before the new
    end. A `warn_before` of 0 means no warning."""
    from app.services.grants import WORKER  # grants imports this module

    now = clock.now()
    with sessions() as session:
        windows = session.execute(
            select(Database.id, Database.warn_before).where(Database.warn_before > 0)
        ).all()
        for database_id, warn_before in windows:
            due = (
                session.scalars(
                    select(AccessRequest)
                    .where(
                        AccessRequest.database_id == database_id,
                        AccessRequest.status == RequestStatus.ACTIVE,
                        AccessRequest.warned_at.is_(None),
                        AccessRequest.expires_at > now,
                        AccessRequest.expires_at <= now + timedelta(seconds=warn_before),
                    )
                    .order_by(AccessRequest.expires_at)
                    .limit(settings.batch)
                    .with_for_update(skip_locked=True, of=AccessRequest)
                )
                .unique()
                .all()
            )
            for request in due:
                claimed = session.execute(
                    update(AccessRequest)
                    .where(
                        AccessRequest.id == request.id,
                        AccessRequest.status == RequestStatus.ACTIVE,
                        AccessRequest.warned_at.is_(None),
                    )
                    .values(warned_at=now)
                    .execution_options(synchronize_session=False)
                )
                if claimed.rowcount != 1:  # type: ignore[attr-defined]
                    continue  # extended, revoked or warned meanwhile
                session.refresh(request)
                assert request.expires_at is not None
                ends_in = int((request.expires_at - now).total_seconds())
                extend = how_to_extend(request)
                enqueue(
                    session,
                    event="access_ending",
                    request=request,
                    at=now,
                    actor=WORKER.actor,
                    ends_at=request.expires_at.isoformat(),
                    ends_in=ends_in,
                    extend=extend,
                )
                report.add("warned")
        session.commit()
