"""The floor that bench/service.py measures Drawbridge's API against: a bare Flask + SQLAlchemy endpoint that
parses the same JSON body as `POST /access-requests` and inserts one row, under the same gunicorn settings
and on the same database. No authentication, validation, audit or policy: what is left is the cost of the
stack itself.

    DATABASE_URL=postgresql://... gunicorn -c gunicorn.conf.py --pythonpath bench floor_app:app
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import DateTime, String, Text, Uuid, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class FloorRow(Base):
    __tablename__ = "bench_floor_rows"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    database: Mapped[str] = mapped_column(String(63))
    cidr: Mapped[str] = mapped_column(String(18))
    duration: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def engine_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if scheme in ("postgres", "postgresql") else url


engine = create_engine(engine_url(os.environ.get("DATABASE_URL", "sqlite://")))
app = Flask(__name__)


@app.post("/rows")
def create_row() -> ResponseReturnValue:
    body = request.get_json()
    row = FloorRow(
        id=uuid.uuid4(),
        database=body["database"],
        cidr=body["cidr"],
        duration=body["duration"],
        reason=body["reason"],
        created_at=datetime.now(UTC),
    )
    answer = {"id": str(row.id), "database": row.database, "cidr": row.cidr, "status": "created"}
    with Session(engine) as session:
        session.add(row)
        session.commit()
    return jsonify(answer), 201


@app.get("/healthz")
def health() -> ResponseReturnValue:
    return jsonify(status="ok")
