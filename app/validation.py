"""Parsing of user input that a security service must get exactly right: CIDRs, durations, reasons, names.

Each parser raises `InvalidInput` with a message meant for the person who typed the value.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from datetime import timedelta

import isodate

MAX_DURATION_ACCEPTED = timedelta(days=366)
MAX_REASON_LENGTH = 1000

# Ranges that are not reachable on the public Internet, or are reserved for documentation, so an allow-list
# entry for them is either a mistake or an attempt to open more than intended.
_REFUSED_RANGES: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), label)
    for net, label in (
        ("0.0.0.0/8", "'this network' (reserved)"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments (reserved)"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.88.99.0/24", "deprecated 6to4 relay (reserved)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking (reserved)"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)

_SHORTHAND = re.compile(r"^(?:(\d{1,6})d)?(?:(\d{1,6})h)?(?:(\d{1,6})m)?(?:(\d{1,8})s)?$")
# Checked with fullmatch: `$` also matches before a trailing newline, which would let "main\n" through.
_DATABASE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_HEROKU_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


class InvalidInput(ValueError):
    """A value typed by a user is malformed; the message says what is wrong and what is expected."""


def parse_cidr(value: str, *, max_prefix: int = 28) -> str:
    """Return the canonical `a.b.c.d/n` for an IPv4 address or network that may be opened to the Internet.

    A bare address means /32. Host bits must be clear, the network must be globally routable, and it must be
    no wider than `/max_prefix`.
    """
    text = value.strip()
    if not text:
        raise InvalidInput("a CIDR is required, such as 8.8.8.8/32 or 8.8.8.8")
    if ":" in text:
        raise InvalidInput("IPv6 is not supported by Heroku's mTLS allow-list; give an IPv4 address")
    if "/" not in text:
        text += "/32"
    address, _, prefix = text.partition("/")
    # str.isdigit() also admits superscripts and other scripts' digits, which int() refuses or reads.
    if not (prefix.isascii() and prefix.isdigit()) or len(prefix) > 2 or not 0 <= int(prefix) <= 32:
        raise InvalidInput(f"{value!r} has an invalid prefix length; use /0 to /32")
    try:
        ipaddress.IPv4Address(address)
    except ipaddress.AddressValueError:
        raise InvalidInput(f"{value!r} is not an IPv4 address or CIDR such as 8.8.8.8/32") from None
    try:
        network = ipaddress.IPv4Network(f"{address}/{int(prefix)}")
    except ValueError:
        masked = ipaddress.IPv4Network(f"{address}/{int(prefix)}", strict=False)
        raise InvalidInput(f"{value!r} has host bits set; did you mean {masked}?") from None
    for refused, label in _REFUSED_RANGES:
        if network.overlaps(refused):
            raise InvalidInput(
                f"{network} is not a public Internet address: it overlaps {refused}, which is {label}"
            )
    if not network.is_global:
        raise InvalidInput(f"{network} is not a globally routable address")
    if network.prefixlen < max_prefix:
        raise InvalidInput(
            f"{network} is wider than this database allows: the widest accepted prefix is /{max_prefix}"
        )
    return str(network)


def parse_duration(value: str, *, allow_zero: bool = False) -> timedelta:
    """Parse an ISO 8601 duration (`PT2H`) or shorthand (`90m`, `2h`, `1d`, `1h30m`) into a timedelta.

    Zero is refused unless `allow_zero`: no access lasts no time, but an allowance (`self_extension`,
    `warn_before`) may be none, and `format_duration` renders it as `PT0S`."""
    text = value.strip()
    if not text:
        raise InvalidInput("a duration is required, such as PT2H, 90m, 2h or 1d")
    if not text.isascii():
        # `\d` matches any script's digits; a duration is written in ASCII digits only.
        raise InvalidInput(f"{value!r} is not a duration; use ISO 8601 (PT2H) or 90m, 2h, 1d")
    match = _SHORTHAND.match(text.lower())
    if match and any(match.groups()):
        days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
        if days > MAX_DURATION_ACCEPTED.days:
            raise InvalidInput(f"{value!r} is too long")
        duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif text[:1] in ("P", "p"):
        try:
            parsed = isodate.parse_duration(text.upper())
        except (isodate.ISO8601Error, ValueError, OverflowError):
            raise InvalidInput(f"{value!r} is not a valid ISO 8601 duration such as PT2H") from None
        if not isinstance(parsed, timedelta):
            raise InvalidInput(f"{value!r} uses years or months; give days, hours or minutes instead")
        duration = parsed
    else:
        raise InvalidInput(f"{value!r} is not a duration; use ISO 8601 (PT2H) or 90m, 2h, 1d")
    if duration > MAX_DURATION_ACCEPTED:
        raise InvalidInput(f"{value!r} is too long")
    if duration < timedelta(0) or (duration == timedelta(0) and not allow_zero):
        raise InvalidInput(f"{value!r} must be longer than zero")
    if duration.microseconds:
        raise InvalidInput(f"{value!r} must be a whole number of seconds")
    return duration


def format_duration(seconds: int) -> str:
    """Render seconds as the ISO 8601 duration clients send (`PT1H30M`; nothing is `PT0S`)."""
    if seconds == 0:
        return "PT0S"
    return isodate.duration_isoformat(timedelta(seconds=seconds))  # type: ignore[no-any-return]


def clean_reason(value: str) -> str:
    """A reason is required, at most 1000 characters, and free of control characters."""
    text = value.strip()
    if not text:
        raise InvalidInput("a reason is required: say why you need access")
    if len(text) > MAX_REASON_LENGTH:
        raise InvalidInput(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    check_printable(text, "the reason")
    return text


def check_printable(text: str, what: str) -> None:
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn") and char != "\u200d":
            raise InvalidInput(f"{what} contains a control or invisible character ({ord(char):#06x})")


def check_database_name(value: str) -> str:
    if not _DATABASE_NAME.fullmatch(value):
        raise InvalidInput(
            "a database name is 1-63 lowercase letters, digits and dashes, starting with a letter or digit"
        )
    return value


def check_user_name(value: str) -> str:
    if not _USER_NAME.fullmatch(value):
        raise InvalidInput(
            "a user name is 1-64 letters, digits and . _ @ + -, starting with a letter or digit"
        )
    return value


def check_heroku_name(value: str, what: str) -> str:
    if not _HEROKU_NAME.fullmatch(value):
        raise InvalidInput(f"{what} {value!r} is not a valid Heroku name or id")
    return value
