"""Notifications: events are written to an outbox in the transaction of the change they announce; the worker
delivers them (Slack incoming webhook, signed generic webhooks) with retries, so a slow or dead receiver
never blocks or breaks a request and no notification is lost.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from app.models import AccessRequest, Notification

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
