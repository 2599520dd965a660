"""`/databases`: registering Heroku Postgres add-ons and changing their access policy."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from app.api.blueprint import Blueprint
from app.api.context import principal, runtime, session
from app.api.schemas import (
    DatabaseCreateSchema,
    DatabaseListSchema,
    DatabasePolicySchema,
    DatabaseSchema,
    database_dict,
)
from app.services import databases
from app.services.databases import POLICY_FIELDS, Policy

blp = Blueprint(
    "databases",
    __name__,
    url_prefix="/databases",
    description="Registered Heroku Postgres databases and the policy that governs access to each.",
)


_NULL_MEANS = {
    "reason_pattern": "",
    "approvers": {},
    "auto_approve": [],
    "self_extension": 0,
    "warn_before": 0,
}


def _policy(data: dict[str, Any]) -> Policy:
    given = {key: data[key] for key in POLICY_FIELDS if key in data}
    for key, cleared in _NULL_MEANS.items():
        if key in given and given[key] is None:
            given[key] = cleared  # an explicit null turns the setting off
    return Policy(**given)


@blp.route("")
class DatabaseCollection(MethodView):
    @blp.response(200, DatabaseListSchema)
    @blp.errors(401, 403)
    def get(self) -> dict[str, Any]:
        """List registered databases (any role)."""
        who = principal()
        items = databases.list_databases(session(), principal=who)
        return {"items": [database_dict(db) for db in items]}

    @blp.arguments(DatabaseCreateSchema)
    @blp.response(201, DatabaseSchema)
    @blp.errors(400, 401, 403, 409, 413, 415, 502, 503)
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Register a database (admin). The add-on is resolved at Heroku and its mTLS must be Operational."""
        who = principal()
        rt = runtime()
        db = databases.register_database(
            session(),
            principal=who,
            heroku=rt.heroku,
            name=data["name"],
            app=data["app"],
            addon=data["addon"],
            policy=_policy(data),
            min_duration=rt.config.min_duration,
            clock=rt.clock,
        )
        return database_dict(db)


@blp.route("/<string:name>")
class DatabaseItem(MethodView):
    @blp.response(200, DatabaseSchema)
    @blp.errors(401, 403, 404)
    def get(self, name: str) -> dict[str, Any]:
        """One database and its policy (any role)."""
        who = principal()
        return database_dict(databases.show_database(session(), principal=who, name=name))

    @blp.arguments(DatabasePolicySchema, required=False)
    @blp.response(200, DatabaseSchema)
    @blp.errors(400, 401, 403, 404, 413, 415)
    def patch(self, data: dict[str, Any], name: str) -> dict[str, Any]:
        """Change a database's policy (admin); each change is audited."""
        who = principal()
        rt = runtime()
        db = databases.update_policy(
            session(),
            principal=who,
            name=name,
            policy=_policy(data),
            min_duration=rt.config.min_duration,
            clock=rt.clock,
        )
        return database_dict(db)
