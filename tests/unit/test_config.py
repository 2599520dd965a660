"""Configuration from the environment: safe defaults, Heroku's URL form, and fast failure on bad values."""

from __future__ import annotations

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
