"""`/metrics`: Prometheus metrics for an admin token (see `app.metrics` for what is measured)."""

from __future__ import annotations

from flask import Response, request
from flask.views import MethodView

from app.api.blueprint import Blueprint
from app.api.context import principal
from app.api.instrumentation import web_metrics
from app.models import Role

blp = Blueprint("metrics", __name__, description="Prometheus metrics, for an admin token.")

PROMETHEUS_TEXT = "text/plain; version=0.0.4"


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.response(
        200,
        {"type": "string"},
        content_type=PROMETHEUS_TEXT,
        description="Prometheus text exposition format (OpenMetrics when the Accept header asks for it)",
    )
    @blp.errors(401, 403)
    def get(self) -> Response:
        """Prometheus metrics of the service, its database and its workers.

        HTTP requests and latency; grants and rules per database; the expiry lag; Heroku calls and the
        rate-limit budget; worker jobs and heartbeats; work waiting for retry; rules that could not be
        deleted."""
        principal().require(Role.ADMIN)
        body, content_type = web_metrics().render(request.headers.get("Accept", ""))
        return Response(body, status=200, content_type=content_type)
