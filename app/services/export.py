"""Audit exports for offline review or a SIEM: CSV or NDJSON, streamed with flat memory however many rows,
with the chain head so the export can be checked against the live chain later."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import IO, Any

from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from app.models import AuditEvent
from app.services.audit import EventFilter

COLUMNS = (
    "seq",
    "id",
    "occurred_at",
    "actor",
    "on_behalf_of",
    "source",
    "action",
    "request_id",
    "database",
    "details",
    "prev_hash",
    "hash",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> str:
    """A CSV cell. A leading formula character would make spreadsheets run the cell, so it is quoted
    (OWASP's advice on CSV injection); JSON is written canonically (sorted keys)."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    elif isinstance(value, datetime):
        text = value.isoformat()
    else:
        text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _columns() -> list[Any]:
    return [getattr(AuditEvent, name) for name in COLUMNS]


def count(session: Session, filters: EventFilter) -> int:
    query = filters.apply(select(AuditEvent)).with_only_columns(func.count())
    return int(session.scalar(query) or 0)


def rows(session: Session, filters: EventFilter, *, batch: int = 10_000) -> Iterator[Row[Any]]:
    """Matching events in chain order, fetched through a server-side cursor `batch` rows at a time."""
    query = filters.apply(select(AuditEvent)).with_only_columns(*_columns()).order_by(AuditEvent.seq)
    result = session.execute(query.execution_options(yield_per=batch, stream_results=True))
    yield from result


def as_dict(row: Row[Any]) -> dict[str, Any]:
    data = dict(zip(COLUMNS, row, strict=True))
    data["occurred_at"] = data["occurred_at"].isoformat()
    data["request_id"] = str(data["request_id"]) if data["request_id"] is not None else None
    return data


def write(
    session: Session,
    out: IO[str],
    *,
    fmt: str,
    filters: EventFilter,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Write the selection to `out` as "csv" or "ndjson"; return a summary with the chain head (the last
    event of the whole chain when the export was made) and the SHA-256 of what was written."""
    digest = hashlib.sha256()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    written, pending = 0, 0
    first: int | None = None
    last: tuple[int, str] | None = None

    def flush() -> None:
        text = buffer.getvalue()
        out.write(text)
        digest.update(text.encode())
        buffer.seek(0)
        buffer.truncate()

    if fmt == "csv":
        writer.writerow(COLUMNS)
    for row in rows(session, filters):
        if fmt == "csv":
            writer.writerow([cell(value) for value in row])
        else:
            buffer.write(json.dumps(as_dict(row), separators=(",", ":"), ensure_ascii=False))
            buffer.write("\n")
        written += 1
        pending += 1
        if first is None:
            first = row.seq
        last = (row.seq, row.hash)
        if pending >= 5000:
            flush()
            progress(pending)
            pending = 0
    flush()
    progress(pending)
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    return {
        "format": fmt,
        "count": written,
        "since": filters.since.isoformat() if filters.since else None,
        "until": filters.until.isoformat() if filters.until else None,
        "first_seq": first,
        "last_seq": last[0] if last else None,
        "last_hash": last[1] if last else None,
        "chain_head": {"seq": head[0], "hash": head[1]} if head else None,
        "sha256": digest.hexdigest(),
    }
