"""Defences every request and response passes through: text PostgreSQL cannot store and chunked bodies over
the size limit are refused at the door, and every answer carries headers that keep browsers and caches from
doing anything clever with it."""

from __future__ import annotations

from collections.abc import Iterable

from flask import Flask, Response, request
from werkzeug.exceptions import NotFound, RequestEntityTooLarge

from app.services.errors import InvalidRequest

NUL = "\x00"

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # An API serves no scripts, styles, frames or images: a browser may load nothing on its behalf.
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Answers carry requests, audit events and who-had-access reports: no cache may keep them.
    "Cache-Control": "no-store",
}
HSTS = "max-age=31536000; includeSubDomains"


def refuse_nul() -> None:
    """PostgreSQL text and jsonb cannot hold U+0000: a NUL in a query parameter or a form field (Slack's
    bodies) is invalid input (422), and nothing can be found under a path that contains one (404). JSON
    bodies are checked as they are parsed."""
    if NUL in request.path:
        raise NotFound("nothing here has a name containing a NUL character")
    _check_fields(request.args.items(multi=True), "query parameters")
    if request.mimetype == "application/x-www-form-urlencoded":
        request.get_data(cache=True)  # parse the form from a copy: signature checks need the raw body
        _check_fields(request.form.items(multi=True), "form fields")


def _check_fields(fields: Iterable[tuple[str, str]], what: str) -> None:
    for name, value in fields:
        if NUL in name or NUL in value:
            raise InvalidRequest(
                f"{what} may not contain the NUL character (U+0000)", field=name.replace(NUL, "")
            )


def refuse_oversized_streams() -> None:
    """A body without Content-Length (chunked) is cut off at MAX_CONTENT_LENGTH by werkzeug, silently: left
    alone, its first 64 KiB would be read as if they were the whole body. One byte more means it is over."""
    limit = request.max_content_length
    streamed = request.content_length is None and request.environ.get("wsgi.input_terminated")
    if not streamed or limit is None:
        return
    if len(request.get_data(cache=True)) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    # Browsers heed HSTS only over HTTPS (RFC 6797): sent when the client came over HTTPS, as seen directly
    # or through DRAWBRIDGE_TRUSTED_PROXIES hops (X-Forwarded-Proto, which a client alone cannot fake).
    if request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", HSTS)
    return response


def init_hardening(app: Flask) -> None:
    app.before_request(refuse_oversized_streams)
    app.before_request(refuse_nul)
    app.after_request(add_security_headers)
