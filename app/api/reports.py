"""`/reports/access`: who could reach a database at a moment or during a window, as JSON or CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from datetime import UTC
from typing import Any

from flask import Response, request
from werkzeug.exceptions import NotAcceptable

from app.api.blueprint import Blueprint
from app.api.context import principal, session
from app.api.schemas import GRANT_COLUMNS, AccessReportQuerySchema, AccessReportSchema
from app.services import reports
from app.services.export import cell

blp = Blueprint(
    "reports",
    __name__,
    url_prefix="/reports",
    description="Reports for auditors on who could reach which database, and when.",
)

JSON = "application/json"
CSV = "text/csv"


def _grant_row(grant: reports.Grant) -> dict[str, Any]:
    row = asdict(grant)
    row["status"] = grant.status.value
    return row


def _csv_value(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return ";".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _stream_csv(grants: Iterable[reports.Grant]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(GRANT_COLUMNS)
    for grant in grants:
        row = _grant_row(grant)
        writer.writerow([cell(_csv_value(row[column])) for column in GRANT_COLUMNS])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


@blp.route("/access", methods=["GET"])
@blp.arguments(AccessReportQuerySchema, location="query")
@blp.response(200, AccessReportSchema)
@blp.alt_response(
    200,
    schema={"type": "string"},
    content_type=CSV,
    success=True,
    description="The grants as CSV, one per row (send Accept: text/csv)",
)
@blp.errors(401, 403, 404, 406)
def access_report(args: dict[str, Any]) -> Any:
    """Who could reach a database, and who approved it (auditor, admin).

    With `at`: every grant in force at that moment (one that ended exactly then is not, one that started
    exactly then is). With `from` and `to`: every grant that overlapped [from, to). A grant runs from
    activation until the request ended, or until it expires while still active; requests that ended long
    ago are included.
    """
    who = principal()
    fmt: str | None = JSON
    if request.accept_mimetypes:
        fmt = request.accept_mimetypes.best_match([JSON, CSV])
    if fmt is None:
        raise NotAcceptable("ask for application/json or text/csv")
    database = args["database"]
    bounds = {key: args[key].astimezone(UTC) for key in ("at", "start", "end") if key in args}
    if "at" in bounds:
        grants = reports.who_could_reach(session(), principal=who, database=database, at=bounds["at"])
    else:
        grants = reports.grants_between(
            session(), principal=who, database=database, start=bounds["start"], end=bounds["end"]
        )
    if fmt == CSV:
        return Response(_stream_csv(grants), mimetype="text/csv; charset=utf-8")
    return {"database": database, **bounds, "grants": [_grant_row(g) for g in grants]}
