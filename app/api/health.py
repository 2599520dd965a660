"""`/healthz` (the process answers) and `/readyz` (its database answers and a worker sweeps)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.api.blueprint import Blueprint
from app.api.context import runtime, session
from app.api.schemas import HealthSchema
from app.services import heartbeats
from app.services.errors import DomainError, Kind

blp = Blueprint("health", __name__, description="Liveness and readiness probes; no token needed.")


class DatabaseUnreachable(DomainError):
    kind = Kind.UNAVAILABLE
    code = "database_unreachable"


@blp.route("/healthz")
class Health(MethodView):
    @blp.public
    @blp.response(200, HealthSchema)
    def get(self) -> dict[str, Any]:
        """Liveness: the process is up."""
        return {"status": "ok"}


@blp.route("/readyz")
class Ready(MethodView):
    @blp.public
    @blp.response(200, HealthSchema)
    @blp.errors(503)
    def get(self) -> dict[str, Any]:
        """Readiness: the database answers and a worker sweeps.

        503 when the database is unreachable, or when no worker has finished a sweep within
        DRAWBRIDGE_HEARTBEAT_STALE seconds: expired access would then stay open."""
        rt = runtime()
        db = session()
        try:
            db.execute(text("SELECT 1"))
            heartbeats.require_fresh(db, now=rt.clock.now(), stale=rt.config.heartbeat_stale)
        except SQLAlchemyError:
            raise DatabaseUnreachable("the database is not reachable") from None
        finally:
            db.rollback()
        return {"status": "ok"}
