"""CIDR, duration and reason parsing: what a security service must refuse, and what it must accept."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.validation import InvalidInput, clean_reason, format_duration, parse_cidr, parse_duration


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("8.8.8.8", "8.8.8.8/32"),
        ("8.8.8.8/32", "8.8.8.8/32"),
        (" 1.1.1.0/28 ", "1.1.1.0/28"),
        ("52.1.2.16/29", "52.1.2.16/29"),
    ],
)
def test_public_ipv4_addresses_and_networks_are_accepted_in_canonical_form(
    given: str, canonical: str
) -> None:
    assert parse_cidr(given) == canonical


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "reserved"),
        ("192.0.2.10", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.7/32", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.0.8", "IETF"),
    ],
)
def test_addresses_that_are_not_on_the_public_internet_are_refused(given: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        parse_cidr(given, max_prefix=16)


def test_a_wide_network_that_contains_a_special_range_is_refused() -> None:
    with pytest.raises(InvalidInput, match="192.0.0.0/16 is not a public Internet address"):
        parse_cidr("192.0.0.0/16", max_prefix=16)
    with pytest.raises(InvalidInput, match="overlaps 203.0.113.0/24"):
        parse_cidr("203.0.112.0/23", max_prefix=16)


def test_a_network_wider_than_the_policy_allows_is_refused() -> None:
    assert parse_cidr("8.8.8.0/28", max_prefix=28) == "8.8.8.0/28"
    with pytest.raises(InvalidInput, match="widest accepted prefix is /28"):
        parse_cidr("8.8.8.0/27", max_prefix=28)
    with pytest.raises(InvalidInput, match="widest accepted prefix is /32"):
        parse_cidr("8.8.8.0/31", max_prefix=32)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "required"),
        ("8.8.8.8/33", "prefix"),
        ("8.8.8.8/-1", "prefix"),
        ("8.8.8.8/abc", "prefix"),
        ("8.8.8", "not an IPv4"),
        ("8.8.8.256", "not an IPv4"),
        ("example.com", "not an IPv4"),
        ("8.8.8.9/28", "host bits set; did you mean 8.8.8.0/28"),
        ("2001:db8::1/128", "IPv6"),
        ("::ffff:8.8.8.8", "IPv6"),
        ("08.8.8.8", "not an IPv4"),
        ("0.0.0.0/0", "not a public"),
        ("8.8.8.8/0", "host bits set"),
    ],
)
def test_malformed_cidrs_are_refused_with_a_helpful_message(given: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_cidr(given)


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("PT2H", 7200),
        ("PT90M", 5400),
        ("pt1h30m", 5400),
        ("P1D", 86400),
        ("PT45S", 45),
        ("90m", 5400),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("2H", 7200),
    ],
)
def test_durations_in_iso_8601_or_shorthand_are_parsed(given: str, seconds: int) -> None:
    assert parse_duration(given) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "required"),
        ("2 hours", "not a duration"),
        ("P1M", "years or months"),
        ("P1Y", "years or months"),
        ("PT0S", "longer than zero"),
        ("0m", "longer than zero"),
        ("PT0.5S", "whole number of seconds"),
        ("P400D", "too long"),
        ("999999d", "too long"),
        ("PTXH", "not a valid ISO 8601"),
        ("-1h", "not a duration"),
        ("h", "not a duration"),
    ],
)
def test_bad_durations_are_refused(given: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_duration(given)


def test_durations_render_as_iso_8601() -> None:
    assert format_duration(5400) == "PT1H30M"
    assert format_duration(86400) == "P1D"


def test_a_reason_is_required_bounded_and_free_of_control_characters() -> None:
    assert clean_reason("  INC-42: restore a row  ") == "INC-42: restore a row"
    assert clean_reason("réparer la base 🔧") == "réparer la base 🔧"
    for bad, message in [
        ("   ", "required"),
        ("x" * 1001, "longer than 1000"),
        ("ok\x00", "control"),
        ("line\nbreak", "control"),
        ("bidi \u202e trick", "control"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            clean_reason(bad)


@pytest.mark.parametrize(
    "given", ["8.8.8.8/\u00b2", "8.8.8.8/\u0663\u0662", "8.8.8.8/" + "0" * 5000, "8.8.8.8/032"]
)
def test_a_prefix_length_not_written_as_one_or_two_ascii_digits_is_refused(given: str) -> None:
    with pytest.raises(InvalidInput, match="invalid prefix length"):
        parse_cidr(given)


@pytest.mark.parametrize("given", ["\u0661h", "1\u0661m", "\u0669\u0660m", "PT\u0661H"])
def test_a_duration_written_with_other_scripts_digits_is_refused(given: str) -> None:
    with pytest.raises(InvalidInput, match="not a duration"):
        parse_duration(given)
