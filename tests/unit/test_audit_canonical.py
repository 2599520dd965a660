"""The text an audit event's hash covers is written out field by field; it must stay exactly the JSON
document `json.dumps(..., sort_keys=True)` makes of the event, which chains already in use were built on."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.models import AuditEvent
from app.services import audit, export

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


def reference(event: AuditEvent) -> bytes:
    content: dict[str, Any] = {
        "seq": event.seq,
        "occurred_at": event.occurred_at.astimezone(UTC).isoformat(),
        "actor": event.actor,
        "on_behalf_of": event.on_behalf_of,
        "source": event.source,
        "action": event.action,
        "request_id": str(event.request_id) if event.request_id is not None else None,
        "database": event.database,
        "details": event.details,
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@settings(max_examples=300, derandomize=True)
@given(
    seq=st.integers(1, 2**62),
    moment=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    offset_minutes=st.integers(-12 * 60, 14 * 60),
    actor=text,
    on_behalf_of=st.none() | text,
    action=text,
    request_id=st.none() | st.uuids(),
    database=st.none() | text,
    details=st.dictionaries(text, json_values, max_size=5),
)
def test_canonical_text_is_the_sorted_json_of_the_event(
    seq: int,
    moment: datetime,
    offset_minutes: int,
    actor: str,
    on_behalf_of: str | None,
    action: str,
    request_id: uuid.UUID | None,
    database: str | None,
    details: dict[str, Any],
) -> None:

    local = moment.astimezone(timezone(timedelta(minutes=offset_minutes)))
    event = AuditEvent(
        seq=seq,
        occurred_at=local,
        actor=actor,
        on_behalf_of=on_behalf_of,
        source="api",
        action=action,
        request_id=request_id,
        database=database,
        details=details,
    )
    assert audit.canonical(event) == reference(event)


@settings(max_examples=300, derandomize=True)
@given(
    free=st.lists(st.none() | text, min_size=5, max_size=5),
    details=st.dictionaries(text, json_values, max_size=4),
    request_id=st.none() | st.uuids(),
)
def test_a_csv_line_is_what_the_csv_module_writes(
    free: list[str | None], details: dict[str, Any], request_id: uuid.UUID | None
) -> None:
    actor, obo, source, action, database = free
    event: audit.Plain = (
        7,
        3,
        "2026-03-01T00:00:00+00:00",
        actor or "",
        obo,
        source or "",
        action or "",
        str(request_id) if request_id else None,
        database,
        json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
        "a" * 64,
        "b" * 64,
    )
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow([export.cell(value) for value in event])
    assert export.csv_line(event) == buffer.getvalue()
    assert next(csv.reader(io.StringIO(export.csv_line(event))))[9] == event[9]


@settings(max_examples=300, derandomize=True)
@given(details=st.dictionaries(text, json_values | st.floats(allow_nan=False, allow_infinity=False)))
def test_details_from_postgresql_text_are_canonical_json(details: dict[str, Any]) -> None:
    as_postgresql_writes_it = json.dumps(details)  # ", " and ": " between items, as jsonb's output
    expected = json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert audit.canonical_details(as_postgresql_writes_it) == expected
