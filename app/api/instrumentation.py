"""Every HTTP request gets an id (the caller's sane `X-Request-Id`, else a new one), echoed in the response,
carried by every log line and every Heroku call made while answering it; each request is counted, timed
and logged in one line when answered."""

from __future__ import annotations

import logging
import time
from contextvars import Token

from flask import Flask, Response, current_app, g, request

from app import logs, metrics, telemetry
from app.runtime import Runtime

REQUEST_ID_HEADER = "X-Request-Id"
UNMATCHED_ROUTE = "unmatched"

log = logging.getLogger(__name__)


def web_metrics() -> metrics.WebMetrics:
    found: metrics.WebMetrics = current_app.extensions["drawbridge_metrics"]
    return found


def _begin() -> None:
    g.request_started = time.perf_counter()
    g.request_id = logs.accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    g.request_id_token = logs.bind_request_id(g.request_id)
    g.heroku_sink_token = telemetry.bind_heroku_sink(web_metrics().count_heroku_call)


def _finish(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id is None:  # a request that failed before _begin ran
        return response
    response.headers[REQUEST_ID_HEADER] = request_id
    seconds = time.perf_counter() - g.request_started
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    web_metrics().observe_request(
        method=request.method, route=route, status=response.status_code, seconds=seconds
    )
    log.info(
        "%s %s %s %.1fms",
        request.method,
        request.path,
        response.status_code,
        seconds * 1000,
        extra={
            "method": request.method,
            "route": route,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round(seconds * 1000, 1),
        },
    )
    return response


def _end(_exc: BaseException | None = None) -> None:
    sink: Token[telemetry.HerokuCallSink | None] | None = g.pop("heroku_sink_token", None)
    if sink is not None:
        telemetry.unbind_heroku_sink(sink)
    bound: Token[str | None] | None = g.pop("request_id_token", None)
    if bound is not None:
        logs.unbind_request_id(bound)


def init_instrumentation(app: Flask, runtime: Runtime) -> metrics.WebMetrics:
    """Register the hooks ahead of every other (rate limits, idempotency), so those run under the request
    id, the count and the log line see the final response, and the id is unbound last."""
    web = metrics.WebMetrics(runtime)
    app.extensions["drawbridge_metrics"] = web
    app.before_request_funcs.setdefault(None, []).insert(0, _begin)
    # Flask runs after_request and teardown hooks in reverse order of registration.
    app.after_request_funcs.setdefault(None, []).insert(0, _finish)
    app.teardown_request_funcs.setdefault(None, []).insert(0, _end)
    return web
