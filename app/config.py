"""Configuration: the one reader of the process environment.

`Config.from_env()` validates every setting up front and raises `ConfigError` with a message that names the
variable, so a misconfigured process refuses to start instead of failing later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "sqlite:///drawbridge.db"
DEFAULT_HEROKU_API_URL = "https://api.heroku.com"
DEFAULT_HEROKU_DATA_API_URL = "https://api.data.heroku.com"

_RATE_LIMIT = re.compile(r"^\s*(\d+)\s*(?:/|\s+per\s+)\s*(second|minute|hour|day)\s*$")
# Storages the rate limiter (the `limits` library) can share between processes, and its in-process one.
RATE_LIMIT_STORAGE_SCHEMES = (
    "memory",
    "redis",
    "rediss",
    "redis+unix",
    "redis+sentinel",
    "redis+cluster",
    "valkey",
    "valkeys",
    "memcached",
    "mongodb",
    "mongodb+srv",
)


class ConfigError(ValueError):
    """A setting in the environment is missing or malformed."""


@dataclass(frozen=True)
class Config:
    database_url: str = DEFAULT_DATABASE_URL
    heroku_api_token: str | None = field(default=None, repr=False)
    heroku_api_url: str = DEFAULT_HEROKU_API_URL
    heroku_data_api_url: str = DEFAULT_HEROKU_DATA_API_URL
    sweep_interval: float = 1.0
    poll_interval: float = 15.0
    min_duration: int = 60
    provisioning_timeout: float = 1800.0
    reconcile_interval: float = 300.0
    heroku_timeout: float = 10.0
    rate_limit: str = "600/minute"
    rate_limit_storage: str = field(default="memory://", repr=False)
    trusted_proxies: int = 0
    slack_signing_secret: str | None = field(default=None, repr=False)
    slack_webhook_url: str | None = field(default=None, repr=False)
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str | None = field(default=None, repr=False)
    simulate: bool = False
    log_format: str = "json"
    heartbeat_stale: float = 60.0
    metrics_multiproc_dir: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read and validate every setting; raise ConfigError naming the first bad variable."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None or value.strip() == "":
                return None
            return value.strip()

        webhook_urls = tuple(
            _url("DRAWBRIDGE_WEBHOOK_URLS", item.strip())
            for item in (get("DRAWBRIDGE_WEBHOOK_URLS") or "").split(",")
            if item.strip()
        )
        slack_webhook = get("SLACK_WEBHOOK_URL")
        sweep_interval = _seconds("DRAWBRIDGE_SWEEP_INTERVAL", get("DRAWBRIDGE_SWEEP_INTERVAL"), 1.0)
        return cls(
            database_url=normalize_database_url(get("DATABASE_URL") or DEFAULT_DATABASE_URL),
            heroku_api_token=get("HEROKU_API_TOKEN"),
            heroku_api_url=_url("HEROKU_API_URL", get("HEROKU_API_URL") or DEFAULT_HEROKU_API_URL),
            heroku_data_api_url=_url(
                "HEROKU_DATA_API_URL", get("HEROKU_DATA_API_URL") or DEFAULT_HEROKU_DATA_API_URL
            ),
            sweep_interval=sweep_interval,
            poll_interval=_seconds("DRAWBRIDGE_POLL_INTERVAL", get("DRAWBRIDGE_POLL_INTERVAL"), 15.0),
            min_duration=_whole_seconds("DRAWBRIDGE_MIN_DURATION", get("DRAWBRIDGE_MIN_DURATION"), 60),
            provisioning_timeout=_seconds(
                "DRAWBRIDGE_PROVISIONING_TIMEOUT", get("DRAWBRIDGE_PROVISIONING_TIMEOUT"), 1800.0
            ),
            reconcile_interval=_seconds(
                "DRAWBRIDGE_RECONCILE_INTERVAL", get("DRAWBRIDGE_RECONCILE_INTERVAL"), 300.0
            ),
            heroku_timeout=_seconds("DRAWBRIDGE_HEROKU_TIMEOUT", get("DRAWBRIDGE_HEROKU_TIMEOUT"), 10.0),
            rate_limit=_rate_limit(get("DRAWBRIDGE_RATE_LIMIT") or "600/minute"),
            rate_limit_storage=_rate_limit_storage(get("DRAWBRIDGE_RATE_LIMIT_STORAGE") or "memory://"),
            trusted_proxies=_count("DRAWBRIDGE_TRUSTED_PROXIES", get("DRAWBRIDGE_TRUSTED_PROXIES")),
            slack_signing_secret=get("SLACK_SIGNING_SECRET"),
            slack_webhook_url=_url("SLACK_WEBHOOK_URL", slack_webhook) if slack_webhook else None,
            webhook_urls=webhook_urls,
            webhook_secret=get("DRAWBRIDGE_WEBHOOK_SECRET"),
            log_format=_log_format(get("DRAWBRIDGE_LOG_FORMAT")),
            heartbeat_stale=_heartbeat_stale(get("DRAWBRIDGE_HEARTBEAT_STALE"), sweep_interval),
            metrics_multiproc_dir=get("PROMETHEUS_MULTIPROC_DIR"),
        )


def normalize_database_url(url: str) -> str:
    """Accept Heroku's `postgres://` form and plain `postgresql://`, and select the psycopg 3 driver."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"DATABASE_URL must be a URL such as postgres://user@host/db, got {url!r}")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    if scheme in ("postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
        return url
    raise ConfigError(
        f"DATABASE_URL must use postgres:// or sqlite:// (PostgreSQL or SQLite), got scheme {scheme!r}"
    )


def _url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def _seconds(name: str, value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds such as 1 or 0.5, got {value!r}") from None
    if not (seconds > 0 and seconds < 86400):
        raise ConfigError(f"{name} must be more than 0 and less than 86400 seconds, got {value!r}")
    return seconds


def _whole_seconds(name: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name} must be a whole number of seconds of at least 1, got {value!r}")
    return int(value)


def _count(name: str, value: str | None) -> int:
    if value is None:
        return 0
    if not value.isdigit() or int(value) > 10:
        raise ConfigError(f"{name} must be a whole number from 0 to 10, got {value!r}")
    return int(value)


def _rate_limit(value: str) -> str:
    match = _RATE_LIMIT.match(value)
    if not match or int(match.group(1)) < 1:
        raise ConfigError(
            f"DRAWBRIDGE_RATE_LIMIT must look like 600/minute (per second, minute, hour or day), "
            f"got {value!r}"
        )
    return f"{int(match.group(1))}/{match.group(2)}"


def _rate_limit_storage(value: str) -> str:
    # The URI may carry a password: messages name only its scheme.
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in RATE_LIMIT_STORAGE_SCHEMES or (scheme != "memory" and not rest):
        shown = f"{scheme}://" if sep and re.fullmatch(r"[a-z0-9+.-]{1,20}", scheme) else "another value"
        raise ConfigError(
            "DRAWBRIDGE_RATE_LIMIT_STORAGE must be a storage URI such as memory:// or redis://host:6379, "
            f"with one of the schemes {', '.join(RATE_LIMIT_STORAGE_SCHEMES)}; got {shown}"
        )
    return value


def _log_format(value: str | None) -> str:
    if value is None:
        return "json"
    if value.lower() not in ("json", "text"):
        raise ConfigError(f"DRAWBRIDGE_LOG_FORMAT must be json or text, got {value!r}")
    return value.lower()


def _heartbeat_stale(value: str | None, sweep_interval: float) -> float:
    """Seconds without a worker sweep after which /readyz fails: by default a minute, or ten sweep
    intervals when sweeps are rarer than every six seconds."""
    default = max(60.0, 10 * sweep_interval)
    seconds = _seconds("DRAWBRIDGE_HEARTBEAT_STALE", value, default)
    if seconds <= sweep_interval:
        raise ConfigError(
            "DRAWBRIDGE_HEARTBEAT_STALE must be longer than DRAWBRIDGE_SWEEP_INTERVAL "
            f"({sweep_interval:g} s), got {value!r}"
        )
    return seconds
