"""RFC 9457 problem documents for every error the HTTP API returns, and guards on request bodies."""

from __future__ import annotations

import json
from typing import Any

import marshmallow as ma
from flask import Response, current_app
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import BadRequest, HTTPException, UnsupportedMediaType

from app.services.errors import DomainError, InvalidRequest, Kind

PROBLEM_JSON = "application/problem+json"
MAX_JSON_DEPTH = 32

_KIND_STATUS = {
    Kind.INVALID: 422,
    Kind.NOT_FOUND: 404,
    Kind.FORBIDDEN: 403,
    Kind.CONFLICT: 409,
    Kind.UPSTREAM: 502,
    Kind.UNAVAILABLE: 503,
}


class ProblemSchema(ma.Schema):
    """An RFC 9457 problem document (documentation only; errors are rendered by `problem`)."""

    type = ma.fields.String(metadata={"description": "A URI identifying the problem type"})
    title = ma.fields.String(metadata={"description": "Short summary of the problem type"})
    status = ma.fields.Integer(metadata={"description": "The HTTP status code"})
    detail = ma.fields.String(metadata={"description": "What went wrong this time"})
    code = ma.fields.String(metadata={"description": "Drawbridge's machine-readable error code"})
    errors = ma.fields.Dict(metadata={"description": "Field-level validation errors"})
    existing_id = ma.fields.String(metadata={"description": "The live request that a duplicate would repeat"})
    request_status = ma.fields.String(metadata={"description": "The request's current status"})


def problem(
    status: int,
    *,
    title: str,
    detail: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": f"urn:drawbridge:problem:{code}" if code else "about:blank",
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if code:
        body["code"] = code
    body.update({k: v for k, v in extra.items() if v is not None})
    response = current_app.response_class(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def from_http_exception(error: HTTPException) -> Response:
    """Render any werkzeug/flask-smorest HTTP error (including webargs' 422) as a problem document."""
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    errors = data.get("errors") or data.get("messages")
    if isinstance(errors, dict) and set(errors) <= {"json", "query", "headers", "form", "files"}:
        # webargs nests errors under the location; one level less reads better and stays unambiguous.
        flat: dict[str, Any] = {}
        for location in errors.values():
            if isinstance(location, dict):
                flat.update(location)
        errors = flat
    detail = data.get("message") or (error.description if status != 500 else None)
    if status == 422 and not data.get("message"):
        detail = "the request contains invalid fields; see errors"
    headers = dict(data.get("headers") or {})
    if status == 405 and error.get_response().headers.get("Allow"):
        headers["Allow"] = error.get_response().headers["Allow"]
    if status == 500:
        detail = "an unexpected error occurred; it has been logged"
    return problem(
        status,
        title=error.name,
        detail=detail,
        headers=headers,
        errors=errors if errors else None,
    )


def from_domain_error(error: DomainError) -> Response:
    status = _KIND_STATUS[error.kind]
    errors = None
    if isinstance(error, InvalidRequest) and error.field:
        errors = {error.field: [error.message]}
    headers = {"Retry-After": "30"} if status == 503 else None
    return problem(
        status,
        title=_title(status),
        detail=error.message,
        code=error.code,
        errors=errors,
        headers=headers,
        **error.extra,
    )


def _title(status: int) -> str:
    from http import HTTPStatus

    return HTTPStatus(status).phrase


def _depth(value: Any, limit: int) -> int:
    """Depth of nested containers, stopping early once past `limit`."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def load_json_guarded(raw: bytes) -> Any:
    """Parse a JSON body, refusing malformed text and nesting deeper than MAX_JSON_DEPTH (400), and text
    PostgreSQL cannot store (422)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BadRequest(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    where = _unstorable_at(value)
    if where is not None:
        # PostgreSQL text and jsonb hold neither U+0000 nor lone surrogates (which are not UTF-8); refused
        # here, they never reach a query.
        raise InvalidRequest(
            "text may not contain the NUL character (U+0000) or unpaired surrogates (U+D800-U+DFFF)",
            field=where or "body",
        )
    return value


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unstorable_at(value: Any) -> str | None:
    """The dotted path of the first string (or key) PostgreSQL could not store, "" for the top level."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not _storable(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _storable(key):
                    return path or "body"
                stack.append((child, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            for index, child in enumerate(item):
                stack.append((child, f"{path}.{index}" if path else str(index)))
    return None


class GuardedParser(FlaskParser):
    """webargs' parser with body guards: JSON content type required, depth-limited parsing; and the schema's
    own `unknown` policy in the query string too (webargs ignores unknown query parameters by default), so a
    misspelt filter is refused instead of silently widening what is returned."""

    DEFAULT_VALIDATION_STATUS = 422
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION, "query": None}

    def _raw_load_json(self, req: Any) -> Any:
        data = req.get_data(cache=True)
        if not data:
            return ma.missing
        if not req.is_json:
            raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
        return load_json_guarded(data)
