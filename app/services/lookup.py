"""Resolving what people type in chat to rows: a request id shortened to a unique prefix."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import AccessRequest
from app.services.errors import InvalidRequest, RequestNotFound
from app.services.identity import Principal

MIN_PREFIX = 4


class AmbiguousRequestId(InvalidRequest):
    code = "ambiguous_request_id"


def resolve_request_id(session: Session, *, principal: Principal, prefix: str) -> uuid.UUID:
    """The one request whose id starts with `prefix` (hex digits, dashes ignored) among those `principal`
    may see: their own, or all for approvers, auditors and admins. Reads only; commits nothing.

    Raises InvalidRequest for a prefix that is not hex or shorter than MIN_PREFIX digits, RequestNotFound
    when nothing matches, and AmbiguousRequestId when more than one request does.
    """
    principal.require_any_human_role()
    digits = prefix.strip().lower().replace("-", "")
    if len(digits) < MIN_PREFIX or len(digits) > 32 or any(c not in "0123456789abcdef" for c in digits):
        raise InvalidRequest(f"give at least {MIN_PREFIX} hex characters of the request id", field="id")
    # A prefix is a range of UUIDs, so the primary key index answers it on PostgreSQL and SQLite alike.
    low, high = uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))
    query = select(AccessRequest.id).where(AccessRequest.id >= low, AccessRequest.id <= high)
    if not principal.sees_all_requests:
        query = query.where(AccessRequest.requester_id == principal.user_id)
    found = list(session.scalars(query.order_by(AccessRequest.id).limit(2)))
    if not found:
        raise RequestNotFound(f"no access request has an id starting with {prefix}")
    if len(found) > 1:
        raise AmbiguousRequestId(
            f"more than one request has an id starting with {prefix}; give more characters", field="id"
        )
    return found[0]
