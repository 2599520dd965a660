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

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import AuditEvent
from app.services import audit
from app.services.audit import EventFilter, Plain, batches

COLUMNS = audit.COLUMNS
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


_FORMULA_CHARS = frozenset(_FORMULA_START)
_encode = json.JSONEncoder(ensure_ascii=False).encode
_NDJSON_LINE = (
    '{{"seq":{},"id":{},"occurred_at":"{}","actor":{},"on_behalf_of":{},"source":{},"action":{},'
    '"request_id":{},"database":{},"details":{},"prev_hash":"{}","hash":"{}"}}\n'
)


def count(session: Session, filters: EventFilter) -> int:
    query = filters.apply(select(func.count()).select_from(AuditEvent), session)
    return int(session.scalar(query) or 0)


def rows(session: Session, filters: EventFilter) -> Iterator[Plain]:
    """Matching events in chain order, one `Plain` tuple at a time."""
    for batch in batches(session, filters):
        yield from batch


def _json_text(value: str | None) -> str:
    return "null" if value is None else _encode(value)


def ndjson_line(event: Plain) -> str:
    """One event as a line of JSON, keys in `COLUMNS` order, details as canonical JSON."""
    seq, id_, at, actor, obo, source, action, rid, db, details, prev, digest = event
    return _NDJSON_LINE.format(
        seq,
        id_,
        at,
        _encode(actor),
        _json_text(obo),
        _encode(source),
        _encode(action),
        _json_text(rid),
        _json_text(db),
        details,
        prev,
        digest,
    )


def _text_cell(text: str | None) -> str:
    """A free-text CSV cell: defused as `cell` does it, then quoted where RFC 4180 (and Python's csv
    module, QUOTE_MINIMAL) quotes."""
    if not text:
        return ""
    if text[0] in _FORMULA_CHARS:
        text = "'" + text
    if '"' in text or "," in text or "\n" in text or "\r" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_line(event: Plain) -> str:
    """One event as a CSV line, the same text `csv.writer(lineterminator="\\r\\n")` writes for `cell`s (a
    test holds them equal). Written out because the csv module costs more than the rest of an export
    put together. Only the free-text columns can need defusing; the others are numbers, times, ids,
    hashes and the details, canonical JSON whose line breaks are escaped."""
    seq, id_, at, actor, obo, source, action, rid, db, details, prev, digest = event
    cell = _text_cell
    if '"' in details or "," in details:
        details = '"' + details.replace('"', '""') + '"'
    return (
        f"{seq},{id_},{at},{cell(actor)},{cell(obo)},{cell(source)},{cell(action)},{rid or ''},"
        f"{cell(db)},{details},{prev},{digest}\r\n"
    )


def chunks(
    session: Session, *, fmt: str, filters: EventFilter, stats: dict[str, Any] | None = None
) -> Iterator[str]:
    """The selection as "csv" or "ndjson" text, a chunk per few thousand events; `stats` (if given) is
    kept up to date with the count and the first and last events written."""
    tally = stats if stats is not None else {}
    tally.update(count=0, first_seq=None, last_seq=None, last_hash=None)
    buffer = io.StringIO()
    if fmt == "csv":
        csv.writer(buffer, lineterminator="\r\n").writerow(COLUMNS)
    line = csv_line if fmt == "csv" else ndjson_line
    for batch in batches(session, filters):
        buffer.write("".join(map(line, batch)))
        if tally["first_seq"] is None:
            tally["first_seq"] = batch[0][0]
        tally["count"] += len(batch)
        tally["last_seq"], tally["last_hash"] = batch[-1][0], batch[-1][-1]
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def write(
    session: Session,
    out: IO[bytes],
    *,
    fmt: str,
    filters: EventFilter,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Write the selection to `out` in UTF-8; return a summary with the chain head (the last event of the
    whole chain when the export was made) and the SHA-256 of what was written."""
    digest = hashlib.sha256()
    stats: dict[str, Any] = {}
    done = 0
    for text in chunks(session, fmt=fmt, filters=filters, stats=stats):
        data = text.encode()
        out.write(data)
        digest.update(data)
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
