"""The life of an access request on the human side: ask, approve, deny, cancel, revoke, and read.

Every transition is compare-and-set on the status (`UPDATE … WHERE status = :expected`) on a row locked for
the decision, and is committed together with its audit event.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.clock import Clock
from app.models import (
    ALLOWED_TRANSITIONS,
    LIVE_STATUSES,
    AccessRequest,
    Approval,
    Database,
    RequestStatus,
    Role,
    User,
)
from app.services import audit, notify
from app.services.errors import (
    AlreadyApproved,
    Conflict,
    DuplicateLiveRequest,
    InvalidRequest,
    InvalidTransition,
    PermissionDenied,
    PolicyViolation,
    RequestNotFound,
    SelfApprovalForbidden,
)
from app.services.identity import Principal
from app.validation import InvalidInput, clean_reason, parse_cidr, parse_duration


class TooManyLiveRequests(Conflict):
    code = "too_many_live_requests"


def _invalid(exc: InvalidInput, field: str) -> InvalidRequest:
    return InvalidRequest(str(exc), field=field)


def _find_live_duplicate(
    session: Session, *, requester_id: int, database_id: int, cidr: str
) -> AccessRequest | None:
    return session.scalar(
        select(AccessRequest).where(
            AccessRequest.requester_id == requester_id,
            AccessRequest.database_id == database_id,
            AccessRequest.cidr == cidr,
            AccessRequest.status.in_(LIVE_STATUSES),
        )
    )


def request_access(
    session: Session,
    *,
    principal: Principal,
    database: str,
    cidr: str,
    duration: str | None,
    reason: str,
    min_duration: int,
    clock: Clock,
) -> AccessRequest:
    """File a pending request for `principal` under the database's policy; commit with its audit event.

    Raises InvalidRequest/PolicyViolation (422) for input the policy refuses, DuplicateLiveRequest (409,
    carrying the existing id) when the same user already has a live request for this database and CIDR,
    and TooManyLiveRequests (409) past the policy's `max_live_per_user`.
    """
    principal.require(Role.REQUESTER)
    db = session.scalar(select(Database).where(Database.name == database))
    if db is None:
        raise InvalidRequest(f"no database named {database!r} is registered", field="database")
    try:
        network = parse_cidr(cidr, max_prefix=db.max_prefix)
    except InvalidInput as exc:
        raise _invalid(exc, "cidr") from None
    try:
        length = parse_duration(duration) if duration is not None else None
    except InvalidInput as exc:
        raise _invalid(exc, "duration") from None
    try:
        text = clean_reason(reason)
    except InvalidInput as exc:
        raise _invalid(exc, "reason") from None
    seconds = int(length.total_seconds()) if length is not None else db.default_duration
    if seconds < min_duration:
        raise PolicyViolation(
            f"the duration must be at least {timedelta(seconds=min_duration)}", field="duration"
        )
    if seconds > db.max_duration:
        raise PolicyViolation(
            f"{db.name} allows at most {timedelta(seconds=db.max_duration)} per request",
            field="duration",
        )
    if db.reason_pattern and not re.search(db.reason_pattern, text):
        raise PolicyViolation(
            f"{db.name} requires the reason to match {db.reason_pattern!r} (for example a ticket id)",
            field="reason",
        )
    existing = _find_live_duplicate(session, requester_id=principal.user_id, database_id=db.id, cidr=network)
    if existing is not None:
        raise DuplicateLiveRequest(
            f"you already have a live request for {network} on {db.name}",
            existing_id=str(existing.id),
        )
    live = session.scalar(
        select(func.count())
        .select_from(AccessRequest)
        .where(
            AccessRequest.requester_id == principal.user_id,
            AccessRequest.database_id == db.id,
            AccessRequest.status.in_(LIVE_STATUSES),
        )
    )
    if (live or 0) >= db.max_live_per_user:
        raise TooManyLiveRequests(
            f"you already have {live} live requests on {db.name}, the most its policy allows"
        )
    now = clock.now()
    request = AccessRequest(
        id=uuid.uuid4(),
        database_id=db.id,
        requester_id=principal.user_id,
        filed_by_id=principal.bot_id,
        cidr=network,
        duration=seconds,
        reason=text,
        status=RequestStatus.PENDING,
        created_at=now,
    )
    session.add(request)
    try:
        session.flush()
    except IntegrityError:
        # Another request for the same grant committed between our check and our insert.
        session.rollback()
        existing = _find_live_duplicate(
            session, requester_id=principal.user_id, database_id=db.id, cidr=network
        )
        raise DuplicateLiveRequest(
            f"you already have a live request for {network} on {db.name}",
            existing_id=str(existing.id) if existing else None,
        ) from None
    session.refresh(request)
    audit.record(
        session,
        principal=principal,
        action="access_request:create",
        at=now,
        request=request,
        details={"cidr": network, "duration": seconds, "reason": text, "status": "pending"},
    )
    matched = _auto_approval(db, principal, seconds)
    if matched is None:
        notify.enqueue(session, event="request_created", request=request, at=now, actor=principal.actor)
    else:
        transition(
            session, request, expected={RequestStatus.PENDING}, to=RequestStatus.APPROVED, decided_at=now
        )
        audit.record(
            session,
            principal=POLICY,
            action="access_request:auto_approve",
            at=now,
            request=request,
            details={"rule": matched, "policy": (db.auto_approve or [])[matched], "status": "approved"},
        )
        notify.enqueue(
            session,
            event="request_decided",
            request=request,
            at=now,
            actor=POLICY.actor,
            decision="approved by policy",
        )
    session.commit()
    return request


POLICY = Principal(user_id=0, name="policy", roles=frozenset(), source="policy")


def _auto_approval(db: Database, principal: Principal, seconds: int) -> int | None:
    """The index of the first auto-approval rule the request matches, or None (people must decide)."""
    for index, rule in enumerate(db.auto_approve or []):
        users = rule.get("users")
        limit = rule.get("max_duration")
        if users is not None and principal.name not in users:
            continue
        if limit is not None and seconds > limit:
            continue
        return index
    return None


def _lock(session: Session, request_id: uuid.UUID) -> AccessRequest:
    request = session.scalar(
        select(AccessRequest)
        .where(AccessRequest.id == request_id)
        .with_for_update(of=AccessRequest)
        .execution_options(populate_existing=True)
    )
    if request is None:
        raise RequestNotFound(f"no access request {request_id}")
    return request


def transition(
    session: Session,
    request: AccessRequest,
    *,
    expected: Collection[RequestStatus],
    to: RequestStatus,
    **values: Any,
) -> None:
    """Compare-and-set `request` from one of `expected` to `to`; InvalidTransition if someone got there first.

    Does not commit: the caller adds the audit event and commits both together.
    """
    if to not in ALLOWED_TRANSITIONS[request.status] and request.status in expected:
        raise InvalidTransition(f"a request cannot go from {request.status.value} to {to.value}")
    if request.status not in expected:
        raise InvalidTransition(
            f"the request is {request.status.value}; this needs it to be "
            + " or ".join(sorted(s.value for s in expected)),
            request_status=request.status.value,
        )
    result = session.execute(
        update(AccessRequest)
        .where(AccessRequest.id == request.id, AccessRequest.status == request.status)
        .values(status=to, **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise InvalidTransition("the request changed while this was being decided; reload it")
    session.refresh(request)


def _may_approve(principal: Principal, db: Database) -> None:
    """The approver role is needed; a database's `approvers` policy narrows it to listed users or roles."""
    principal.require(Role.APPROVER)
    allowed = db.approvers
    if allowed is None:
        return
    if principal.name in (allowed.get("users") or []):
        return
    if principal.has(*(Role(r) for r in allowed.get("roles") or [])):
        return
    raise PermissionDenied(f"you are not among the approvers of {db.name}")


def _refuse_if_lapsed(request: AccessRequest, now: datetime) -> None:
    """Raise InvalidTransition when the request's deadline has passed and only the worker's next sweep
    has not yet recorded it: a pending request past its approval window cannot be approved any more, and
    access past its end cannot be extended (that would revive access that has already lapsed)."""
    if request.status is RequestStatus.PENDING:
        window = timedelta(seconds=request.database.approval_window)
        if request.created_at <= now - window:
            raise InvalidTransition(
                f"the approval window ({window}) closed at {(request.created_at + window).isoformat()}; "
                "the request is timing out",
                request_status=request.status.value,
            )
    elif request.status is RequestStatus.ACTIVE and request.expires_at and request.expires_at <= now:
        raise InvalidTransition(
            f"the access ended at {request.expires_at.isoformat()} and is being closed",
            request_status=request.status.value,
        )


def _decision(request: AccessRequest) -> str:
    """What an approval or denial decides: the request itself, or its pending extension."""
    if request.status is RequestStatus.PENDING:
        return "request"
    if request.status is RequestStatus.ACTIVE and request.pending_extension:
        return "extension"
    raise InvalidTransition(
        f"the request is {request.status.value}; there is nothing to decide",
        request_status=request.status.value,
    )


def approve(
    session: Session,
    *,
    principal: Principal,
    request_id: uuid.UUID,
    comment: str | None,
    clock: Clock,
) -> AccessRequest:
    """Record `principal`'s approval of a pending request, or of an active request's pending extension.
    Once the policy's quorum of distinct approvers is reached the request becomes approved (or the
    extension is applied). Commits the approval, any change and one audit event together.

    Raises SelfApprovalForbidden, PermissionDenied (not an approver of this database), InvalidTransition
    (nothing to decide), AlreadyApproved, RequestNotFound.
    """
    principal.require(Role.APPROVER)
    request = _lock(session, request_id)
    if request.requester_id == principal.user_id:
        raise SelfApprovalForbidden("you cannot approve your own request; someone else must")
    _may_approve(principal, request.database)
    deciding = _decision(request)
    now = clock.now()
    _refuse_if_lapsed(request, now)
    round_ = request.approval_round
    if any(a.approver_id == principal.user_id and a.round == round_ for a in request.approvals):
        raise AlreadyApproved(f"you have already approved this {deciding}")
    note = _clean_comment(comment, "comment")
    session.add(
        Approval(
            request_id=request.id,
            requester_id=request.requester_id,
            approver_id=principal.user_id,
            round=round_,
            comment=note,
            created_at=now,
        )
    )
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise AlreadyApproved(f"you have already approved this {deciding}") from None
    count = session.scalar(
        select(func.count())
        .select_from(Approval)
        .where(Approval.request_id == request.id, Approval.round == round_)
    )
    required = request.database.approvals_required
    reached = (count or 0) >= required
    details: dict[str, Any] = {"comment": note, "approvals": count, "approvals_required": required}
    if deciding == "request":
        if reached:
            transition(
                session, request, expected={RequestStatus.PENDING}, to=RequestStatus.APPROVED, decided_at=now
            )
        audit.record(
            session,
            principal=principal,
            action="access_request:approve",
            at=now,
            request=request,
            details={**details, "status": request.status.value},
        )
        if reached:
            notify.enqueue(
                session,
                event="request_decided",
                request=request,
                at=now,
                actor=principal.actor,
                decision="approved",
            )
    else:
        added = request.pending_extension or 0
        audit.record(
            session,
            principal=principal,
            action="access_request:approve_extension",
            at=now,
            request=request,
            details={**details, "extension": added, "round": round_},
        )
        if reached:
            _apply_extension(session, request, added=added, now=now, by=principal, self_service=False)
    session.commit()
    session.refresh(request)
    return request


def deny(
    session: Session,
    *,
    principal: Principal,
    request_id: uuid.UUID,
    reason: str,
    clock: Clock,
) -> AccessRequest:
    """Deny a pending request, or an active request's pending extension (the access itself stays); commit
    with its audit event. The requester cannot deny their own (they cancel)."""
    principal.require(Role.APPROVER)
    request = _lock(session, request_id)
    if request.requester_id == principal.user_id:
        raise SelfApprovalForbidden("you cannot decide your own request; cancel it instead")
    _may_approve(principal, request.database)
    deciding = _decision(request)
    text = _clean_comment(reason, "reason", required=True)
    now = clock.now()
    if deciding == "extension":
        added = request.pending_extension
        request.pending_extension = None
        audit.record(
            session,
            principal=principal,
            action="access_request:deny_extension",
            at=now,
            request=request,
            details={"reason": text, "extension": added, "round": request.approval_round},
        )
        notify.enqueue(
            session,
            event="extension_decided",
            request=request,
            at=now,
            actor=principal.actor,
            decision="denied",
            reason=text,
            extension=added,
        )
        session.commit()
        return request
    transition(
        session,
        request,
        expected={RequestStatus.PENDING},
        to=RequestStatus.DENIED,
        decided_at=now,
        ended_at=now,
        end_reason=text,
    )
    audit.record(
        session,
        principal=principal,
        action="access_request:deny",
        at=now,
        request=request,
        details={"reason": text, "status": request.status.value},
    )
    notify.enqueue(
        session,
        event="request_decided",
        request=request,
        at=now,
        actor=principal.actor,
        decision="denied",
        reason=text,
    )
    session.commit()
    return request


def _apply_extension(
    session: Session, request: AccessRequest, *, added: int, now: datetime, by: Principal, self_service: bool
) -> None:
    """Move `expires_at` (the rule stays in place) and announce it; the caller commits."""
    assert request.expires_at is not None
    request.duration += added
    request.expires_at = request.expires_at + timedelta(seconds=added)
    request.pending_extension = None
    request.warned_at = None  # warn again before the new end
    if self_service:
        request.self_extended += added
    audit.record(
        session,
        principal=by,
        action="access_request:extend",
        at=now,
        request=request,
        details={
            "added": added,
            "duration": request.duration,
            "expires_at": request.expires_at.isoformat(),
            "approved_by": "policy (self-extension)" if self_service else "approvers",
        },
    )
    notify.enqueue(
        session,
        event="extension_decided",
        request=request,
        at=now,
        actor=by.actor,
        decision="approved",
        extension=added,
    )


def extend(
    session: Session,
    *,
    principal: Principal,
    request_id: uuid.UUID,
    duration: str,
    clock: Clock,
) -> AccessRequest:
    """Ask for `duration` more on an active request, within the policy's maximum in total. Up to the
    policy's `self_extension` it applies at once; beyond, it waits for approvers like a new request.
    The rule stays in place; only `expires_at` moves. Commits with its audit event.

    Raises InvalidTransition (not active, or an extension already waits), PolicyViolation (past the
    maximum), InvalidRequest (bad duration), RequestNotFound, PermissionDenied.
    """
    principal.require(Role.REQUESTER, Role.ADMIN)
    request = _load_own(session, principal, request_id)
    if request.status is not RequestStatus.ACTIVE:
        raise InvalidTransition(
            f"only active access can be extended; the request is {request.status.value}",
            request_status=request.status.value,
        )
    if request.pending_extension:
        raise InvalidTransition("an extension of this request already waits for approval")
    now = clock.now()
    _refuse_if_lapsed(request, now)
    try:
        added = int(parse_duration(duration).total_seconds())
    except InvalidInput as exc:
        raise _invalid(exc, "duration") from None
    db = request.database
    if request.duration + added > db.max_duration:
        room = max(0, db.max_duration - request.duration)
        raise PolicyViolation(
            f"{db.name} allows at most {timedelta(seconds=db.max_duration)} in total; "
            f"this request can be extended by {timedelta(seconds=room)} more",
            field="duration",
        )
    if request.self_extended + added <= db.self_extension:
        _apply_extension(session, request, added=added, now=now, by=principal, self_service=True)
    else:
        request.pending_extension = added
        request.approval_round += 1
        audit.record(
            session,
            principal=principal,
            action="access_request:request_extension",
            at=now,
            request=request,
            details={"extension": added, "round": request.approval_round},
        )
        notify.enqueue(
            session,
            event="extension_requested",
            request=request,
            at=now,
            actor=principal.actor,
            extension=added,
        )
    session.commit()
    session.refresh(request)
    return request


def _load_own(session: Session, principal: Principal, request_id: uuid.UUID) -> AccessRequest:
    """Lock a request the principal may end: their own, or any if admin. Others' are not found (404)
    unless the principal can see them anyway, in which case the answer is 403."""
    request = _lock(session, request_id)
    if request.requester_id == principal.user_id and principal.has(Role.REQUESTER):
        return request
    if principal.has(Role.ADMIN):
        return request
    if principal.sees_all_requests:
        raise PermissionDenied("only the requester or an admin can do this")
    raise RequestNotFound(f"no access request {request_id}")


def cancel(
    session: Session,
    *,
    principal: Principal,
    request_id: uuid.UUID,
    reason: str | None,
    clock: Clock,
) -> AccessRequest:
    """Withdraw a request that has not been provisioned yet (pending or approved); commit with audit."""
    principal.require(Role.REQUESTER, Role.ADMIN)
    request = _load_own(session, principal, request_id)
    text = _clean_comment(reason, "reason") or f"cancelled by {principal.actor}"
    now = clock.now()
    transition(
        session,
        request,
        expected={RequestStatus.PENDING, RequestStatus.APPROVED},
        to=RequestStatus.CANCELLED,
        ended_at=now,
        end_reason=text,
    )
    audit.record(
        session,
        principal=principal,
        action="access_request:cancel",
        at=now,
        request=request,
        details={"reason": text, "status": request.status.value},
    )
    notify.enqueue(
        session, event="request_ended", request=request, at=now, actor=principal.actor, reason=text
    )
    session.commit()
    return request


def revoke(
    session: Session,
    *,
    principal: Principal,
    request_id: uuid.UUID,
    reason: str | None,
    clock: Clock,
) -> AccessRequest:
    """End access that was granted (approved, provisioning or active) now; commit with audit.

    The request ends at once; the worker deletes the Heroku rule once no live request uses it.
    """
    principal.require(Role.REQUESTER, Role.ADMIN)
    request = _load_own(session, principal, request_id)
    text = _clean_comment(reason, "reason") or f"revoked by {principal.actor}"
    now = clock.now()
    transition(
        session,
        request,
        expected={RequestStatus.APPROVED, RequestStatus.PROVISIONING, RequestStatus.ACTIVE},
        to=RequestStatus.REVOKED,
        ended_at=now,
        end_reason=text,
    )
    audit.record(
        session,
        principal=principal,
        action="access_request:revoke",
        at=now,
        request=request,
        details={"reason": text, "status": request.status.value},
    )
    notify.enqueue(session, event="access_ended", request=request, at=now, actor=principal.actor, reason=text)
    session.commit()
    return request


def _clean_comment(value: str | None, field: str, *, required: bool = False) -> str | None:
    if value is None or not value.strip():
        if required:
            raise InvalidRequest(f"a {field} is required", field=field)
        return None
    try:
        return clean_reason(value)
    except InvalidInput as exc:
        raise InvalidRequest(str(exc).replace("the reason", f"the {field}"), field=field) from None


def get_request(session: Session, *, principal: Principal, request_id: uuid.UUID) -> AccessRequest:
    """One request, if the principal may see it (their own, or any for approvers, auditors, admins)."""
    principal.require_any_human_role()
    request = session.get(AccessRequest, request_id)
    if request is None or not (principal.sees_all_requests or request.requester_id == principal.user_id):
        raise RequestNotFound(f"no access request {request_id}")
    return request


@dataclass(frozen=True)
class RequestPage:
    items: Sequence[AccessRequest]
    next_cursor: str | None


def _encode(request: AccessRequest) -> str:
    raw = json.dumps({"t": request.created_at.isoformat(), "id": str(request.id)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        moment = datetime.fromisoformat(data["t"])
        ident = uuid.UUID(data["id"])
        if moment.tzinfo is None:
            raise ValueError("naive time")
        moment = moment.astimezone(UTC)
    except (binascii.Error, ValueError, KeyError, TypeError, OverflowError):
        raise InvalidRequest("the cursor is not one this API returned", field="cursor") from None
    return moment, ident


def list_requests(
    session: Session,
    *,
    principal: Principal,
    status: RequestStatus | None,
    database: str | None,
    requester: str | None,
    cursor: str | None,
    limit: int,
) -> RequestPage:
    """Newest first. Requesters who are not approvers, auditors or admins see only their own."""
    principal.require_any_human_role()
    query = select(AccessRequest)
    if not principal.sees_all_requests:
        query = query.where(AccessRequest.requester_id == principal.user_id)
    if status is not None:
        query = query.where(AccessRequest.status == status)
    if database is not None:
        query = query.join(Database, Database.id == AccessRequest.database_id).where(
            Database.name == database
        )
    if requester is not None:
        query = query.join(User, User.id == AccessRequest.requester_id).where(User.name == requester)
    if cursor is not None:
        moment, ident = _decode(cursor)
        query = query.where(
            or_(
                AccessRequest.created_at < moment,
                and_(AccessRequest.created_at == moment, AccessRequest.id < ident),
            )
        )
    rows = list(
        session.scalars(
            query.order_by(AccessRequest.created_at.desc(), AccessRequest.id.desc()).limit(limit + 1)
        ).unique()
    )
    items = rows[:limit]
    return RequestPage(items=items, next_cursor=_encode(items[-1]) if len(rows) > limit and items else None)
