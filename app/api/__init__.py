"""The HTTP API: flask-smorest wiring, the problem-document error envelope, and the resource blueprints."""

from __future__ import annotations

import http
import logging
from typing import Any

import flask_smorest
from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from app.api import access_requests, audit_events, databases, health, metrics, reports, slack
from app.api.blueprint import authenticate_first
from app.api.context import close_session
from app.api.hardening import init_hardening
from app.api.idempotency import init_idempotency
from app.api.instrumentation import init_instrumentation
from app.api.problem import (
    PROBLEM_JSON,
    ProblemSchema,
    from_domain_error,
    from_http_exception,
    load_json_guarded,
)
from app.api.ratelimit import document_rate_limit, init_rate_limit
from app.services.errors import DomainError

log = logging.getLogger(__name__)

API_TITLE = "Drawbridge"
API_VERSION = "0.1.0"
MAX_BODY_BYTES = 64 * 1024


class GuardedJSONProvider(DefaultJSONProvider):
    """Flask's own JSON parsing (request.get_json) gets the same depth guard as the schemas."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return load_json_guarded(s.encode() if isinstance(s, str) else s)


ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "The scheme to authenticate with (RFC 9110): Bearer, or Slack's signature",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        }
    },
    503: {
        "Retry-After": {
            "description": "Seconds to wait before asking again",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


class Api(flask_smorest.Api):  # type: ignore[misc]
    """flask-smorest's Api whose every error is an RFC 9457 problem document."""

    ERROR_SCHEMA = ProblemSchema

    def handle_http_exception(self, error: HTTPException) -> Response:
        if (error.code or 500) >= 500:
            log.error("request failed with %s", error.code, exc_info=error.__cause__ or error)
        return from_http_exception(error)

    def _register_responses(self) -> None:
        # Error responses are documented with the problem+json media type they are sent with, and with the
        # headers that come with them.
        for status in http.HTTPStatus:
            response: dict[str, Any] = {"description": status.phrase}
            if status >= 400:
                response["content"] = {PROBLEM_JSON: {"schema": self.ERROR_SCHEMA}}
            if status in ERROR_HEADERS:
                response["headers"] = ERROR_HEADERS[status]
            self.spec.components.response(status.name, response, lazy=True)
        self.spec.components.response(
            "DEFAULT_ERROR",
            {
                "description": "Default error response",
                "content": {PROBLEM_JSON: {"schema": self.ERROR_SCHEMA}},
            },
            lazy=True,
        )


def _document_headers(api: Api) -> None:
    """Headers every bearer-authenticated operation understands: X-On-Behalf-Of (bot tokens), and
    Idempotency-Key on each POST."""
    on_behalf = {
        "name": "X-On-Behalf-Of",
        "in": "header",
        "required": False,
        "description": "With a bot token: the user to act for, whose own permissions then apply",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"},
    }
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Retries with the same key and body get the first answer; kept 24 hours per token",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    }
    for path, operations in api.spec._paths.items():
        for method, operation in operations.items():
            if method not in ("get", "post", "patch") or operation.get("security") == []:
                continue
            if path.startswith("/slack/"):
                continue
            extra = [on_behalf] + ([idempotency_key] if method == "post" else [])
            operation["parameters"] = [*operation.get("parameters", []), *extra]


def init_api(app: Flask) -> Api:
    app.json_provider_class = GuardedJSONProvider
    app.json = GuardedJSONProvider(app)
    app.json.sort_keys = False
    app.config.update(
        API_TITLE=API_TITLE,
        API_VERSION=API_VERSION,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        API_SPEC_OPTIONS={
            "info": {
                "description": (
                    "Temporary, approved, audited access to Heroku Postgres databases in Private and "
                    "Shield Spaces. Authenticate with `Authorization: Bearer <token>`; errors are "
                    "RFC 9457 problem documents."
                )
            },
            "security": [{"bearerAuth": []}],
            "components": {
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "bearerFormat": "dbt_<id>_<secret>",
                    }
                }
            },
        },
    )
    api = Api(app)
    for module in (health, databases, access_requests, audit_events, reports, slack, metrics):
        api.register_blueprint(module.blp)
    _document_headers(api)
    document_rate_limit(api.spec, api.spec._paths)
    app.register_error_handler(DomainError, from_domain_error)
    init_instrumentation(app, app.extensions["drawbridge"])
    # Before-request hooks run in this order: the rate limit first, so a refused request costs least.
    init_rate_limit(app, app.extensions["drawbridge"].config)
    app.before_request(authenticate_first)
    init_hardening(app)
    init_idempotency(app)
    app.teardown_appcontext(close_session)
    return api
