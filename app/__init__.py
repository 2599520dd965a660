"""Drawbridge: temporary, approved, audited access to Heroku Postgres over mTLS."""

from __future__ import annotations

from flask import Flask

from app.config import Config
from app.runtime import Runtime, build_runtime


def create_app(config: Config | None = None, *, runtime: Runtime | None = None) -> Flask:
    """Wire the web application; `runtime` lets tests and `serve --with-worker` share one runtime."""
    from app.api import init_api

    rt = runtime or build_runtime(config or Config.from_env())
    app = Flask(__name__)
    app.extensions["drawbridge"] = rt
    app.extensions["drawbridge_api"] = init_api(app)
    if rt.config.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # Each trusted proxy (Heroku's router is one) appends to X-Forwarded-For; the client is the entry
        # that many hops from the right. The left-most entry is whatever the client claimed. The same hops
        # say whether the client came over HTTPS (X-Forwarded-Proto), which decides HSTS.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=rt.config.trusted_proxies, x_proto=rt.config.trusted_proxies
        )
    return app
