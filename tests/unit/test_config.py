"""Configuration from the environment: safe defaults, Heroku's URL form, and fast failure on bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import DEFAULT_DATABASE_URL, Config, ConfigError


def test_defaults_need_no_environment_at_all() -> None:
    config = Config.from_env({})
    assert config.database_url == DEFAULT_DATABASE_URL
    assert config.database_url.startswith("sqlite:///")
    assert config.heroku_api_url == "https://api.heroku.com"
    assert config.heroku_data_api_url == "https://api.data.heroku.com"
    assert (config.sweep_interval, config.poll_interval, config.min_duration) == (1.0, 15.0, 60)
    assert config.rate_limit == "600/minute"
    assert config.trusted_proxies == 0
    assert config.heroku_api_token is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db.example.com:5432/d1", "postgresql+psycopg://u:p@db.example.com:5432/d1"),
        ("postgresql://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:////var/lib/drawbridge.db", "sqlite:////var/lib/drawbridge.db"),
    ],
)
def test_heroku_style_and_plain_database_urls_select_psycopg(given: str, expected: str) -> None:
    assert Config.from_env({"DATABASE_URL": given}).database_url == expected


def test_fractional_intervals_are_accepted() -> None:
    config = Config.from_env({"DRAWBRIDGE_SWEEP_INTERVAL": "0.5", "DRAWBRIDGE_POLL_INTERVAL": "2.5"})
    assert (config.sweep_interval, config.poll_interval) == (0.5, 2.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "mysql://u@h/d"),
        ("DATABASE_URL", "not a url"),
        ("HEROKU_API_URL", "ftp://api.heroku.com"),
        ("HEROKU_DATA_API_URL", "api.data.heroku.com"),
        ("DRAWBRIDGE_SWEEP_INTERVAL", "fast"),
        ("DRAWBRIDGE_SWEEP_INTERVAL", "0"),
        ("DRAWBRIDGE_SWEEP_INTERVAL", "-1"),
        ("DRAWBRIDGE_POLL_INTERVAL", "nan"),
        ("DRAWBRIDGE_MIN_DURATION", "1.5"),
        ("DRAWBRIDGE_MIN_DURATION", "0"),
        ("DRAWBRIDGE_RATE_LIMIT", "lots"),
        ("DRAWBRIDGE_RATE_LIMIT", "0/minute"),
        ("DRAWBRIDGE_RATE_LIMIT_STORAGE", "localhost:6379"),
        ("DRAWBRIDGE_RATE_LIMIT_STORAGE", "async+redis://localhost:6379"),
        ("DRAWBRIDGE_RATE_LIMIT_STORAGE", "redis://"),
        ("DRAWBRIDGE_TRUSTED_PROXIES", "-1"),
        ("DRAWBRIDGE_TRUSTED_PROXIES", "many"),
        ("DRAWBRIDGE_WEBHOOK_URLS", "https://ok.example.com/hook, nope"),
        ("SLACK_WEBHOOK_URL", "hooks.slack.com"),
    ],
)
def test_a_bad_value_fails_fast_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Config.from_env({name: value})


def test_secrets_never_appear_in_the_config_repr() -> None:
    config = Config.from_env({"HEROKU_API_TOKEN": "hk-secret-123", "SLACK_SIGNING_SECRET": "sl-456"})
    assert "hk-secret-123" not in repr(config)
    assert "sl-456" not in repr(config)
    assert config.heroku_api_token == "hk-secret-123"


def test_observability_settings_default_to_json_logs_and_a_minute_without_a_sweep() -> None:
    config = Config.from_env({})
    assert (config.log_format, config.heartbeat_stale, config.metrics_multiproc_dir) == ("json", 60.0, None)
    assert Config.from_env({"DRAWBRIDGE_SWEEP_INTERVAL": "30"}).heartbeat_stale == 300.0
    assert Config.from_env({"DRAWBRIDGE_LOG_FORMAT": "Text"}).log_format == "text"
    assert Config.from_env({"DRAWBRIDGE_HEARTBEAT_STALE": "15"}).heartbeat_stale == 15.0


def test_the_multiprocess_metrics_directory_is_read_from_prometheus_clients_variable(tmp_path: Path) -> None:
    assert Config.from_env({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}).metrics_multiproc_dir == str(tmp_path)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DRAWBRIDGE_LOG_FORMAT": "xml"}, "DRAWBRIDGE_LOG_FORMAT"),
        ({"DRAWBRIDGE_HEARTBEAT_STALE": "soon"}, "DRAWBRIDGE_HEARTBEAT_STALE"),
        ({"DRAWBRIDGE_HEARTBEAT_STALE": "5", "DRAWBRIDGE_SWEEP_INTERVAL": "5"}, "DRAWBRIDGE_HEARTBEAT_STALE"),
    ],
)
def test_bad_observability_settings_fail_fast(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Config.from_env(env)


def test_the_rate_limit_storage_defaults_to_this_process_and_accepts_a_shared_one() -> None:
    assert Config.from_env({}).rate_limit_storage == "memory://"
    shared = Config.from_env({"DRAWBRIDGE_RATE_LIMIT_STORAGE": "rediss://:pw@cache.example.com:6380/0"})
    assert shared.rate_limit_storage == "rediss://:pw@cache.example.com:6380/0"


def test_a_rate_limit_storage_password_appears_neither_in_errors_nor_in_the_repr() -> None:
    with pytest.raises(ConfigError) as refused:
        Config.from_env({"DRAWBRIDGE_RATE_LIMIT_STORAGE": "rdis://:hunter2@cache.example.com"})
    assert "hunter2" not in str(refused.value) and "rdis://" in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        Config.from_env({"DRAWBRIDGE_RATE_LIMIT_STORAGE": "user:hunter2@cache.example.com"})
    assert "hunter2" not in str(refused.value)
    config = Config.from_env({"DRAWBRIDGE_RATE_LIMIT_STORAGE": "redis://:hunter2@cache.example.com"})
    assert "hunter2" not in repr(config)
