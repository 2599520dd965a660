"""`/healthz` (the process answers) and `/readyz` (its database answers)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.api.blueprint import Blueprint
from app.api.context import session
from app.api.schemas import HealthSchema
from app.services.errors import DomainError, Kind

blp = Blueprint("health", __name__, description="Liveness and readiness probes; no token needed.")


class DatabaseUnreachable(DomainError):
    kind = Kind.UNAVAILABLE
    code = "database_unreachable"


@blp.route("/healthz")
class Health(MethodView):
    @blp.doc(security=[])
    @blp.response(200, HealthSchema)
    def get(self) -> dict[str, Any]:
        """Liveness: the process is up."""
        return {"status": "ok"}


@blp.route("/readyz")
class Ready(MethodView):
    @blp.doc(security=[])
    @blp.response(200, HealthSchema)
    @blp.errors(503)
    def get(self) -> dict[str, Any]:
        """Readiness: the database answers."""
        try:
            session().execute(text("SELECT 1"))
        except SQLAlchemyError:
            raise DatabaseUnreachable("the database is not reachable") from None
        return {"status": "ok"}
