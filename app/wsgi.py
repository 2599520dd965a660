"""WSGI entry point for gunicorn (`gunicorn app.wsgi:app`), configured from the environment."""

from __future__ import annotations

from app import create_app, logs
from app.config import Config

config = Config.from_env()
logs.configure_for(config)
app = create_app(config)
