"""`/audit-events`: the audit log for auditors, as JSON pages or as a streamed CSV / NDJSON export."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Response, request
from flask.views import MethodView
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import NotAcceptable

from app.api.blueprint import Blueprint
from app.api.context import principal, runtime, session
from app.api.schemas import (
    AuditEventListSchema,
    AuditQuerySchema,
    VerificationSchema,
    audit_row,
)
from app.services import audit, export
from app.services.identity import Principal

blp = Blueprint(
    "audit_events",
    __name__,
    url_prefix="/audit-events",
    description="The append-only audit log of every state change.",
)

CSV = "text/csv"
NDJSON = "application/x-ndjson"
_cell = export.cell  # also used by the access report's CSV


def _stream(
    sessions: sessionmaker[Session], who: Principal, filters: audit.EventFilter, fmt: str
) -> Iterator[str]:
    audit.require_auditor(who)
    with sessions() as db:
        yield from export.chunks(db, fmt="csv" if fmt == CSV else "ndjson", filters=filters)


@blp.route("")
class AuditEventCollection(MethodView):
    @blp.arguments(AuditQuerySchema, location="query")
    @blp.response(200, AuditEventListSchema)
    @blp.alt_response(
        200,
        schema={"type": "string"},
        content_type=CSV,
        success=True,
        description="Every matching event as CSV (send Accept: text/csv); cursor and limit are ignored",
    )
    @blp.alt_response(
        200,
        schema={"type": "string"},
        content_type=NDJSON,
        success=True,
        description="Every matching event as one JSON object per line (Accept: application/x-ndjson)",
    )
    @blp.errors(401, 403, 406)
    def get(self, args: dict[str, Any]) -> Any:
        """Query the audit log (auditor, admin): filters, cursor pages, or a full export."""
        who = principal()
        filters = audit.EventFilter(
            request_id=args.get("request_id"),
            actor=args.get("actor"),
            on_behalf_of=args.get("on_behalf_of"),
            database=args.get("database"),
            action=args.get("action"),
            since=args.get("since"),
            until=args.get("until"),
        )
        fmt: str | None = "application/json"
        if request.accept_mimetypes:
            fmt = request.accept_mimetypes.best_match(["application/json", CSV, NDJSON])
        if fmt is None:
            raise NotAcceptable("ask for application/json, text/csv or application/x-ndjson")
        if fmt in (CSV, NDJSON):
            audit.require_auditor(who)
            mimetype = "text/csv; charset=utf-8" if fmt == CSV else NDJSON
            return Response(_stream(runtime().sessions, who, filters, fmt), mimetype=mimetype)
        page = audit.list_events(
            session(),
            principal=who,
            filters=filters,
            cursor=args.get("cursor"),
            limit=args["limit"],
        )
        return {"items": [audit_row(e) for e in page.items], "next_cursor": page.next_cursor}


@blp.route("/verify")
class AuditChainVerification(MethodView):
    @blp.response(200, VerificationSchema)
    @blp.errors(401, 403)
    def get(self) -> dict[str, Any]:
        """Check the whole hash chain (auditor, admin): `ok`, how many events were checked, the chain head,
        and the first broken link if any."""
        who = principal()
        audit.require_auditor(who)
        result = audit.verify(session())
        return {
            "ok": result.ok,
            "count": result.count,
            "head": result.head,
            "first_broken": result.first_broken,
        }
