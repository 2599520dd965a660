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


def chunks(
    session: Session, *, fmt: str, filters: EventFilter, stats: dict[str, Any] | None = None
) -> Iterator[str]:
    """The selection as "csv" or "ndjson" text, in chunks of a few thousand events; `stats` (if given)
    is kept up to date with the count and the first and last events written."""
    tally = stats if stats is not None else {}
    tally.update(count=0, first_seq=None, last_seq=None, last_hash=None)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if fmt == "csv":
        writer.writerow(COLUMNS)
    pending = 0
    for row in rows(session, filters):
        if fmt == "csv":
            writer.writerow([cell(value) for value in row])
        else:
            buffer.write(json.dumps(as_dict(row), separators=(",", ":"), ensure_ascii=False))
            buffer.write("\n")
        pending += 1
        if tally["first_seq"] is None:
            tally["first_seq"] = row.seq
        tally["last_seq"], tally["last_hash"] = row.seq, row.hash
        if pending >= 5000:
            tally["count"] += pending
            pending = 0
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    tally["count"] += pending
    yield buffer.getvalue()


def write(
    session: Session,
    out: IO[str],
    *,
    fmt: str,
    filters: EventFilter,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Write the selection to `out`; return a summary with the chain head (the last event of the whole
    chain when the export was made) and the SHA-256 of what was written."""
    digest = hashlib.sha256()
    stats: dict[str, Any] = {}
    done = 0
    for text in chunks(session, fmt=fmt, filters=filters, stats=stats):
        out.write(text)
        digest.update(text.encode())
        progress(stats["count"] - done)
        done = stats["count"]
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    return {
        "format": fmt,
        "count": stats["count"],
        "since": filters.since.isoformat() if filters.since else None,
        "until": filters.until.isoformat() if filters.until else None,
        "first_seq": stats["first_seq"],
        "last_seq": stats["last_seq"],
        "last_hash": stats["last_hash"],
        "chain_head": {"seq": head[0], "hash": head[1]} if head else None,
        "sha256": digest.hexdigest(),
    }
