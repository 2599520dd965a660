"""`/access-requests`: asking for access, deciding on it, ending it, and reading requests."""

from __future__ import annotations

import uuid
from typing import Any

from flask.views import MethodView

from app.api.blueprint import Blueprint
from app.api.context import caller_address, principal, runtime, session
from app.api.schemas import (
    AccessRequestCreateSchema,
    AccessRequestListSchema,
    AccessRequestQuerySchema,
    AccessRequestSchema,
    ApproveSchema,
    DenySchema,
    EndSchema,
    ExtendSchema,
    request_dict,
)
from app.models import RequestStatus
from app.services import access

blp = Blueprint(
    "access_requests",
    __name__,
    url_prefix="/access-requests",
    description="Requests for temporary access from one IPv4 network to one database.",
)


@blp.route("")
class AccessRequestCollection(MethodView):
    @blp.arguments(AccessRequestQuerySchema, location="query")
    @blp.response(200, AccessRequestListSchema)
    @blp.errors(401, 403)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List requests, newest first. Requesters see their own; approvers, auditors and admins all."""
        who = principal()
        page = access.list_requests(
            session(),
            principal=who,
            status=RequestStatus(args["status"]) if "status" in args else None,
            database=args.get("database"),
            requester=args.get("requester"),
            cursor=args.get("cursor"),
            limit=args["limit"],
        )
        return {"items": [request_dict(r) for r in page.items], "next_cursor": page.next_cursor}

    @blp.arguments(AccessRequestCreateSchema)
    @blp.response(201, AccessRequestSchema)
    @blp.errors(400, 401, 403, 409, 413, 415)
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Ask for access (requester). The request starts pending until enough others approve it."""
        who = principal()
        rt = runtime()
        cidr = data["cidr"]
        if cidr.strip().lower() == "auto":
            cidr = caller_address(who)
        request = access.request_access(
            session(),
            principal=who,
            database=data["database"],
            cidr=cidr,
            duration=data.get("duration"),
            reason=data["reason"],
            min_duration=rt.config.min_duration,
            clock=rt.clock,
        )
        return request_dict(request)


@blp.route("/<uuid:request_id>")
class AccessRequestItem(MethodView):
    @blp.response(200, AccessRequestSchema)
    @blp.errors(401, 403, 404)
    def get(self, request_id: uuid.UUID) -> dict[str, Any]:
        """One request, if it is yours or you may see all requests."""
        who = principal()
        return request_dict(access.get_request(session(), principal=who, request_id=request_id))


@blp.route("/<uuid:request_id>/approve", methods=["POST"])
@blp.arguments(ApproveSchema, required=False)
@blp.response(200, AccessRequestSchema)
@blp.errors(400, 401, 403, 404, 409, 413, 415)
def approve(data: dict[str, Any], request_id: uuid.UUID) -> dict[str, Any]:
    """Approve someone else's pending request (approver). Enough distinct approvals make it approved."""
    who = principal()
    request = access.approve(
        session(),
        principal=who,
        request_id=request_id,
        comment=data.get("comment"),
        clock=runtime().clock,
    )
    return request_dict(request)


@blp.route("/<uuid:request_id>/deny", methods=["POST"])
@blp.arguments(DenySchema)
@blp.response(200, AccessRequestSchema)
@blp.errors(400, 401, 403, 404, 409, 413, 415)
def deny(data: dict[str, Any], request_id: uuid.UUID) -> dict[str, Any]:
    """Deny someone else's pending request (approver), with a reason."""
    who = principal()
    request = access.deny(
        session(),
        principal=who,
        request_id=request_id,
        reason=data["reason"],
        clock=runtime().clock,
    )
    return request_dict(request)


@blp.route("/<uuid:request_id>/cancel", methods=["POST"])
@blp.arguments(EndSchema, required=False)
@blp.response(200, AccessRequestSchema)
@blp.errors(400, 401, 403, 404, 409, 413, 415)
def cancel(data: dict[str, Any], request_id: uuid.UUID) -> dict[str, Any]:
    """Withdraw a pending or approved request (its requester, or an admin)."""
    who = principal()
    request = access.cancel(
        session(),
        principal=who,
        request_id=request_id,
        reason=data.get("reason"),
        clock=runtime().clock,
    )
    return request_dict(request)


@blp.route("/<uuid:request_id>/revoke", methods=["POST"])
@blp.arguments(EndSchema, required=False)
@blp.response(200, AccessRequestSchema)
@blp.errors(400, 401, 403, 404, 409, 413, 415)
def revoke(data: dict[str, Any], request_id: uuid.UUID) -> dict[str, Any]:
    """End granted access now (its requester, or an admin); the Heroku rule is then removed."""
    who = principal()
    request = access.revoke(
        session(),
        principal=who,
        request_id=request_id,
        reason=data.get("reason"),
        clock=runtime().clock,
    )
    return request_dict(request)


@blp.route("/<uuid:request_id>/extend", methods=["POST"])
@blp.arguments(ExtendSchema)
@blp.response(200, AccessRequestSchema)
@blp.errors(400, 401, 403, 404, 409, 413, 415)
def extend(data: dict[str, Any], request_id: uuid.UUID) -> dict[str, Any]:
    """Ask for more time on active access (its requester, or an admin). Within the policy's self-extension
    allowance it applies at once; beyond, approvers decide it as they decide requests (approve / deny)."""
    who = principal()
    request = access.extend(
        session(), principal=who, request_id=request_id, duration=data["duration"], clock=runtime().clock
    )
    return request_dict(request)
