"""Per-token API rate limiting with flask-limiter: one budget (DRAWBRIDGE_RATE_LIMIT) per token across the
whole API, or per client address for requests without a valid token. Health probes and Slack's signed
endpoints are exempt. Counters live in DRAWBRIDGE_RATE_LIMIT_STORAGE (this process's memory by default).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from flask import Flask, Response, current_app, request
from flask_limiter import Limiter, RateLimitExceeded
from limits.errors import ConfigurationError
from sqlalchemy.exc import SQLAlchemyError

from app.api.context import close_session, token_principal
from app.api.problem import PROBLEM_JSON, ProblemSchema, problem
from app.config import Config, ConfigError

log = logging.getLogger(__name__)

EXTENSION = "drawbridge_limiter"
EXEMPT_PATHS = frozenset({"/healthz", "/readyz"})
EXEMPT_PREFIX = "/slack/"
RATE_LIMITED = "RATE_LIMITED"


def is_exempt(path: str) -> bool:
    """Probes must answer however busy a client is; Slack retries on its own and every Slack request is
    authenticated by its signature, not by a token."""
    return path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIX)


def rate_limit_key() -> str:
    """The budget a request draws on: its token's id (never the secret), else the client's address as seen
    through DRAWBRIDGE_TRUSTED_PROXIES. Only a verified token counts: a made-up token carrying someone's
    token id draws on the sender's address, so it cannot spend that person's budget."""
    try:
        caller = token_principal()
    except SQLAlchemyError:
        # The view meets the same failure and reports it; the limiter only needs a key.
        close_session()
        caller = None
    if caller is not None and caller.token_id is not None:
        return f"token:{caller.token_id}"
    return f"address:{request.remote_addr or 'unknown'}"


def _limiter() -> Limiter:
    limiter: Limiter = current_app.extensions[EXTENSION]
    return limiter


def _seconds_until(moment: float) -> int:
    # The limits library keeps its windows in wall-clock epoch seconds, not on Drawbridge's clock.
    return max(1, math.ceil(moment - time.time()))


def too_many_requests(error: RateLimitExceeded) -> Response:
    current = _limiter().current_limit
    wait = _seconds_until(current.window[0]) if current is not None else 1
    return problem(
        429,
        title="Too Many Requests",
        detail=f"this token (or, without one, this address) may make {error.limit.limit} requests; "
        f"retry in {wait} s",
        code="rate_limited",
        headers={"Retry-After": str(wait)},
    )


def add_rate_limit_headers(response: Response) -> Response:
    """X-RateLimit-Limit, -Remaining and -Reset (epoch seconds) on every limited response."""
    current = _limiter().current_limit
    if current is None:
        return response
    try:
        reset, remaining = current.window
        response.headers["X-RateLimit-Limit"] = str(current.limit.amount)
        response.headers["X-RateLimit-Remaining"] = str(max(0, remaining))
        response.headers["X-RateLimit-Reset"] = str(math.ceil(reset))
    except Exception:
        # The headers are a courtesy: a storage hiccup while reading them must not fail the answer.
        log.warning("could not read the rate limit window for the response headers", exc_info=True)
    return response


def init_rate_limit(app: Flask, config: Config) -> Limiter:
    """Register the limiter's hooks on `app`; register it before anything else that costs work per request
    (idempotency claims), so a refused request costs as little as possible."""
    shared = not config.rate_limit_storage.startswith("memory://")
    limiter = Limiter(
        rate_limit_key,
        application_limits=[config.rate_limit],
        storage_uri=config.rate_limit_storage,
        strategy="fixed-window",
        key_prefix="drawbridge",
        headers_enabled=False,
        # A shared storage that goes away degrades to per-process counting instead of failing requests.
        in_memory_fallback_enabled=shared,
    )
    limiter.request_filter(lambda: is_exempt(request.path))
    try:
        limiter.init_app(app)
    except ConfigurationError as exc:
        # The message names a missing client library; Config has checked the scheme, so it holds no URI.
        scheme = config.rate_limit_storage.partition("://")[0]
        raise ConfigError(f"DRAWBRIDGE_RATE_LIMIT_STORAGE ({scheme}://) cannot be used: {exc}") from None
    app.extensions[EXTENSION] = limiter
    app.register_error_handler(RateLimitExceeded, too_many_requests)
    app.after_request(add_rate_limit_headers)
    return limiter


def document_rate_limit(spec: Any, paths: dict[str, dict[str, Any]]) -> None:
    """Document the 429 answer on every operation the limiter covers."""
    spec.components.response(
        RATE_LIMITED,
        {
            "description": "Too many requests from this token (or, without a valid token, this address)",
            "headers": {
                "Retry-After": {
                    "description": "Seconds until the budget refills",
                    "schema": {"type": "integer", "minimum": 1},
                },
                "X-RateLimit-Limit": {
                    "description": "Requests allowed per window",
                    "schema": {"type": "integer"},
                },
                "X-RateLimit-Remaining": {
                    "description": "Requests left in this window",
                    "schema": {"type": "integer"},
                },
                "X-RateLimit-Reset": {
                    "description": "When the window ends, in Unix seconds",
                    "schema": {"type": "integer"},
                },
            },
            "content": {PROBLEM_JSON: {"schema": ProblemSchema}},
        },
    )
    for path, operations in paths.items():
        if is_exempt(path):
            continue
        for method, operation in operations.items():
            if method in ("get", "post", "patch", "put", "delete"):
                operation.setdefault("responses", {})["429"] = spec.components.get_ref(
                    "response", RATE_LIMITED
                )
