"""Slack request signatures, checked against Slack's published example, and the `/drawbridge` grammar."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from app import slack

# From Slack's "Verifying requests from Slack".
EXAMPLE_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
EXAMPLE_TIMESTAMP = "1531420618"
EXAMPLE_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
EXAMPLE_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
SIGNED_AT = datetime.fromtimestamp(int(EXAMPLE_TIMESTAMP), UTC)


def verify(
    *,
    secret: str | None = EXAMPLE_SECRET,
    timestamp: str | None = EXAMPLE_TIMESTAMP,
    signature: str | None = EXAMPLE_SIGNATURE,
    body: bytes = EXAMPLE_BODY,
    now: datetime = SIGNED_AT + timedelta(seconds=30),
) -> None:
    slack.verify_signature(secret=secret, timestamp=timestamp, signature=signature, body=body, now=now)


def test_slacks_published_example_verifies() -> None:
    assert (
        slack.sign(secret=EXAMPLE_SECRET, timestamp=EXAMPLE_TIMESTAMP, body=EXAMPLE_BODY) == EXAMPLE_SIGNATURE
    )
    verify()


def test_the_signature_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[object, object]] = []
    real: Callable[..., bool] = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(slack.hmac, "compare_digest", spy)
    verify()
    assert compared == [(EXAMPLE_SIGNATURE.encode(), EXAMPLE_SIGNATURE.encode())]


@pytest.mark.parametrize(
    "body",
    [
        EXAMPLE_BODY.replace(b"text=", b"text=approve+1234"),
        EXAMPLE_BODY + b"&extra=1",
        EXAMPLE_BODY[:-1],
        b"",
    ],
)
def test_a_tampered_body_is_refused(body: bytes) -> None:
    with pytest.raises(slack.SignatureError, match="does not match"):
        verify(body=body)


def test_a_wrong_secret_is_refused() -> None:
    with pytest.raises(slack.SignatureError, match="does not match"):
        verify(secret="8f742231b10e8888abcd99yyyzzz85a6")


def test_a_signature_for_another_timestamp_is_refused() -> None:
    with pytest.raises(slack.SignatureError, match="does not match"):
        verify(timestamp="1531420619", now=SIGNED_AT)


@pytest.mark.parametrize("skew", [301, -301, 3600, -86400])
def test_a_timestamp_more_than_five_minutes_off_is_refused_either_way(skew: int) -> None:
    with pytest.raises(slack.SignatureError, match="five minutes"):
        verify(now=SIGNED_AT + timedelta(seconds=skew))


@pytest.mark.parametrize("skew", [0, 300, -300])
def test_a_timestamp_up_to_five_minutes_off_is_accepted(skew: int) -> None:
    verify(now=SIGNED_AT + timedelta(seconds=skew))


@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [(None, EXAMPLE_SIGNATURE), (EXAMPLE_TIMESTAMP, None), ("", EXAMPLE_SIGNATURE), (EXAMPLE_TIMESTAMP, "")],
)
def test_missing_headers_are_refused(timestamp: str | None, signature: str | None) -> None:
    with pytest.raises(slack.SignatureError, match="required"):
        verify(timestamp=timestamp, signature=signature)


@pytest.mark.parametrize(
    ("timestamp", "signature", "message"),
    [
        ("1531420618.0", EXAMPLE_SIGNATURE, "Unix time"),
        ("-1531420618", EXAMPLE_SIGNATURE, "Unix time"),
        ("15314e6", EXAMPLE_SIGNATURE, "Unix time"),
        ("9" * 40, EXAMPLE_SIGNATURE, "Unix time"),
        (EXAMPLE_TIMESTAMP, EXAMPLE_SIGNATURE.replace("v0=", "v1="), "not a v0"),
        (EXAMPLE_TIMESTAMP, EXAMPLE_SIGNATURE.upper(), "not a v0"),
        (EXAMPLE_TIMESTAMP, EXAMPLE_SIGNATURE[:-2], "not a v0"),
        (EXAMPLE_TIMESTAMP, EXAMPLE_SIGNATURE[:-1] + "é", "not a v0"),
        (EXAMPLE_TIMESTAMP, EXAMPLE_SIGNATURE[3:], "not a v0"),
    ],
)
def test_garbled_headers_are_refused(timestamp: str, signature: str, message: str) -> None:
    with pytest.raises(slack.SignatureError, match=message):
        verify(timestamp=timestamp, signature=signature)


@pytest.mark.parametrize("secret", [None, ""])
def test_nothing_is_accepted_without_a_signing_secret(secret: str | None) -> None:
    with pytest.raises(slack.SignatureError, match="SLACK_SIGNING_SECRET"):
        verify(secret=secret)


# -- the /drawbridge grammar ---------------------------------------------------------------------------------

FULL_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("", slack.HelpCommand()),
        ("   ", slack.HelpCommand()),
        ("help", slack.HelpCommand()),
        ("HELP", slack.HelpCommand()),
        ("list", slack.ListCommand()),
        (
            "request main 8.8.8.8 2h INC-1 restore  a row",
            slack.RequestCommand(
                database="main", cidr="8.8.8.8", duration="2h", reason="INC-1 restore  a row"
            ),
        ),
        (
            "request main 8.8.8.8/32 PT90M fix &lt;prod&gt; &amp; more",
            slack.RequestCommand(
                database="main", cidr="8.8.8.8/32", duration="PT90M", reason="fix <prod> & more"
            ),
        ),
        ("approve abcd1234", slack.ApproveCommand(request_id="abcd1234", comment=None)),
        ("approve ABCD1234 looks fine", slack.ApproveCommand(request_id="abcd1234", comment="looks fine")),
        (f"approve {FULL_ID}", slack.ApproveCommand(request_id=FULL_ID, comment=None)),
        ("deny abcd use the replica", slack.DenyCommand(request_id="abcd", reason="use the replica")),
        ("revoke 0f1e2d3c-4b", slack.RevokeCommand(request_id="0f1e2d3c-4b")),
        ("extend abcd1234 30m", slack.ExtendCommand(request_id="abcd1234", duration="30m")),
        (f"status {FULL_ID.upper()}", slack.StatusCommand(request_id=FULL_ID)),
        ("  Status   abcd  ", slack.StatusCommand(request_id="abcd")),
    ],
)
def test_command_text_parses(text: str, command: slack.Command) -> None:
    assert slack.parse_command(text) == command


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("request main 8.8.8.8 2h", "usage: `/drawbridge request <database>"),
        ("request", "usage: `/drawbridge request"),
        ("approve", "usage: `/drawbridge approve <id>"),
        ("deny abcd1234", "usage: `/drawbridge deny <id> <reason…>`"),
        ("revoke abcd1234 now", "usage: `/drawbridge revoke <id>`"),
        ("extend abcd1234", "usage: `/drawbridge extend"),
        ("extend abcd1234 1 h", "usage: `/drawbridge extend"),
        ("status", "usage: `/drawbridge status"),
        ("list all", "usage: `/drawbridge list`"),
        ("help me", "usage: `/drawbridge help`"),
        ("status abc", "at least 4 characters"),
        ("status ---abc", "at least 4 characters"),
        ("status zzzz", "is not a request id"),
        ("status abcd%", "is not a request id"),
        ("status " + "a" * 33, "longer than a request id"),
        ("frobnicate abcd", "there is no `frobnicate` command"),
        ("<!channel>", "there is no `&lt;!channel&gt;` command"),
    ],
)
def test_bad_command_text_gets_a_usage_message(text: str, message: str) -> None:
    with pytest.raises(slack.UsageError) as raised:
        slack.parse_command(text)
    assert message in str(raised.value)
