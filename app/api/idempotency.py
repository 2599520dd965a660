"""`Idempotency-Key` on every POST: replay the first answer instead of repeating the effect."""

from __future__ import annotations

import hashlib

from flask import Flask, Response, g, request

from app.api.context import principal, runtime
from app.services import idempotency
from app.services.errors import InvalidRequest

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


def _check(key: str) -> None:
    if not 1 <= len(key) <= 255 or not all(33 <= ord(c) <= 126 for c in key):
        raise InvalidRequest("an Idempotency-Key is 1 to 255 visible ASCII characters", field=HEADER)


def before() -> Response | None:
    key = request.headers.get(HEADER)
    if request.method != "POST" or key is None or request.path.startswith("/slack/"):
        return None
    _check(key)
    who = principal()
    if who.token_id is None:
        return None
    raw = request.get_data(cache=True)
    digest = hashlib.sha256(
        request.method.encode() + b"\n" + request.full_path.encode() + b"\n" + raw
    ).hexdigest()
    rt = runtime()
    outcome = idempotency.begin(
        rt.sessions,
        token_id=who.token_id,
        key=key,
        method=request.method,
        path=request.full_path,
        body_hash=digest,
        now=rt.clock.now(),
    )
    if isinstance(outcome, idempotency.Replay):
        response = Response(outcome.body, status=outcome.status, content_type=outcome.content_type)
        response.headers[REPLAYED] = "true"
        return response
    g.idempotency_claim = outcome
    return None


def after(response: Response) -> Response:
    claim = g.pop("idempotency_claim", None)
    if claim is None:
        return response
    sessions = runtime().sessions
    if response.status_code >= 500:
        idempotency.forget(sessions, claim_id=claim)
    else:
        idempotency.complete(
            sessions,
            claim_id=claim,
            status=response.status_code,
            body=response.get_data(as_text=True),
            content_type=response.content_type or "application/json",
        )
    return response


def teardown(_exc: BaseException | None) -> None:
    claim = g.pop("idempotency_claim", None)
    if claim is not None:
        idempotency.forget(runtime().sessions, claim_id=claim)


def init_idempotency(app: Flask) -> None:
    app.before_request(before)
    app.after_request(after)
    app.teardown_request(teardown)
