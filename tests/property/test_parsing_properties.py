"""Properties of CIDR and duration parsing, over generated input: what is accepted is exactly what may be
opened, in one canonical form, and nothing typed can make a parser fail other than with `InvalidInput`."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.validation import MAX_DURATION_ACCEPTED, InvalidInput, format_duration, parse_cidr, parse_duration
from tests.conftest import TokenFactory

PROPERTIES = settings(max_examples=400, deadline=None, derandomize=True, database=None)

# Every range the README promises to refuse, written out here rather than read from the code under test.
REFUSED = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast included
    )
)

# The databases table allows a policy's max_prefix from /16 to /32.
MAX_PREFIXES = st.integers(16, 32)


def _near_refused_edges() -> st.SearchStrategy[int]:
    """Addresses on and just around the edges of each refused range, where off-by-one mistakes live."""
    return st.sampled_from(REFUSED).flatmap(
        lambda net: st.sampled_from(
            [
                max(0, int(net.network_address) - 1),
                int(net.network_address),
                int(net.broadcast_address),
                min(2**32 - 1, int(net.broadcast_address) + 1),
            ]
        )
    )


ADDRESSES = st.one_of(st.integers(0, 2**32 - 1), _near_refused_edges()).map(ipaddress.IPv4Address)


@st.composite
def networks(draw: st.DrawFn, min_prefix: int = 0) -> ipaddress.IPv4Network:
    address = draw(ADDRESSES)
    prefix = draw(st.integers(min_prefix, 32))
    return ipaddress.IPv4Network((int(address), prefix), strict=False)


def _is_public(network: ipaddress.IPv4Network) -> bool:
    return network.is_global and not any(network.overlaps(refused) for refused in REFUSED)


@st.composite
def cidr_texts(draw: st.DrawFn) -> str:
    """Text a person might type where a CIDR is expected, from well-formed to hostile."""
    address = draw(ADDRESSES)
    prefix = draw(st.integers(0, 32))
    return draw(
        st.one_of(
            networks().map(str),
            st.just(str(address)),
            st.just(f"{address}/{prefix}"),  # host bits may be set
            st.sampled_from([" ", "\t", "\n", ""]).map(lambda pad: f"{pad}{address}/{prefix}{pad}"),
            st.text(max_size=50),
            st.text(alphabet="0123456789./: -x", max_size=25),
            st.text(max_size=4).map(lambda tail: f"{address}/{tail}"),
            st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=3).map(
                lambda digits: f"{address}/{digits}"
            ),
            st.from_regex(r"\A[0-9]{1,4}(\.[0-9]{1,4}){0,4}(/[0-9]{0,5})?\Z"),
        )
    )


# -- CIDRs ---------------------------------------------------------------------------------------------------


@PROPERTIES
@given(cidr_texts(), MAX_PREFIXES)
@example("8.8.8.8/\u00b2", 28)  # a superscript two passes str.isdigit() but not int()
@example("8.8.8.8/" + "0" * 5000, 28)  # past Python's limit on digits int() converts
@example("8.8.8.8/\u0663\u0662", 28)  # Arabic-Indic digits for 32
def test_a_cidr_is_either_refused_with_a_message_or_returned_as_a_canonical_public_network(
    text: str, max_prefix: int
) -> None:
    try:
        accepted = parse_cidr(text, max_prefix=max_prefix)
    except InvalidInput as exc:
        assert str(exc)
        return
    network = ipaddress.IPv4Network(accepted)  # strict: no host bits
    assert str(network) == accepted
    assert network.prefixlen >= max_prefix
    assert _is_public(network)
    typed = text.strip()
    assert typed.isascii()
    assert network == ipaddress.IPv4Network(typed if "/" in typed else f"{typed}/32")
    assert parse_cidr(accepted, max_prefix=max_prefix) == accepted
    assert parse_cidr(accepted, max_prefix=16) == accepted  # a wider policy accepts it too


@PROPERTIES
@given(networks(), MAX_PREFIXES)
def test_a_canonical_network_is_accepted_exactly_when_it_is_public_and_narrow_enough(
    network: ipaddress.IPv4Network, max_prefix: int
) -> None:
    allowed = _is_public(network) and network.prefixlen >= max_prefix
    try:
        accepted = parse_cidr(str(network), max_prefix=max_prefix)
    except InvalidInput:
        assert not allowed, f"{network} is public and within /{max_prefix} but was refused"
        return
    assert allowed, f"{network} was accepted under max_prefix /{max_prefix}"
    assert accepted == str(network)


@PROPERTIES
@given(ADDRESSES)
def test_a_bare_address_means_slash_32(address: ipaddress.IPv4Address) -> None:
    def outcome(text: str) -> str:
        try:
            return parse_cidr(text, max_prefix=32)
        except InvalidInput:
            return "refused"

    bare = outcome(str(address))
    assert bare == outcome(f"{address}/32")
    assert bare in ("refused", f"{address}/32")
    assert (bare != "refused") == _is_public(ipaddress.IPv4Network(f"{address}/32"))


@PROPERTIES
@given(networks(min_prefix=1), MAX_PREFIXES)
def test_a_network_with_host_bits_set_is_refused_and_the_message_offers_the_network(
    network: ipaddress.IPv4Network, max_prefix: int
) -> None:
    host_bits = int(network.hostmask)
    if network.prefixlen == 32 or host_bits == 0:
        return
    inside = ipaddress.IPv4Address(int(network.network_address) + 1)
    try:
        parse_cidr(f"{inside}/{network.prefixlen}", max_prefix=max_prefix)
    except InvalidInput as exc:
        assert f"did you mean {network}" in str(exc)
    else:
        raise AssertionError(f"{inside}/{network.prefixlen} has host bits set but was accepted")


# -- durations -------------------------------------------------------------------------------------------

UNITS = {"d": ("D", 86400), "h": ("H", 3600), "m": ("M", 60), "s": ("S", 1)}


def _outcome(parse: Callable[[str], timedelta], text: str) -> timedelta | str:
    try:
        return parse(text)
    except InvalidInput:
        return "refused"


@PROPERTIES
@given(st.integers(0, 2 * 10**6), st.sampled_from(sorted(UNITS)), st.booleans())
@example(90, "m", False)
@example(2, "h", False)
@example(1, "d", True)
@example(367, "d", False)
def test_shorthand_and_iso_8601_agree_for_a_single_unit(n: int, unit: str, upper: bool) -> None:
    iso_unit, seconds = UNITS[unit]
    shorthand = f"{n}{unit.upper() if upper else unit}"
    iso = f"P{n}D" if unit == "d" else f"PT{n}{iso_unit}"
    parsed = _outcome(parse_duration, shorthand)
    assert parsed == _outcome(parse_duration, iso), (shorthand, iso)
    within = 0 < n * seconds <= MAX_DURATION_ACCEPTED.total_seconds()
    if parsed != "refused":
        assert parsed == timedelta(seconds=n * seconds)
    elif len(str(n)) <= (8 if unit == "s" else 6):
        assert not within, f"{shorthand} is a valid duration but was refused"


@PROPERTIES
@given(
    st.lists(st.sampled_from(sorted(UNITS)), min_size=1, max_size=4, unique=True),
    st.lists(st.integers(0, 400), min_size=4, max_size=4),
)
def test_shorthand_and_iso_8601_agree_for_combined_units(units: list[str], values: list[int]) -> None:
    chosen = {unit: value for unit, value in zip(sorted(units, key="dhms".index), values, strict=False)}
    shorthand = "".join(f"{value}{unit}" for unit, value in chosen.items())
    date = f"{chosen['d']}D" if "d" in chosen else ""
    time = "".join(f"{value}{UNITS[unit][0]}" for unit, value in chosen.items() if unit != "d")
    iso = f"P{date}" + (f"T{time}" if time else "")
    assert _outcome(parse_duration, shorthand) == _outcome(parse_duration, iso), (shorthand, iso)


@st.composite
def duration_texts(draw: st.DrawFn) -> str:
    return draw(
        st.one_of(
            st.text(max_size=40),
            st.from_regex(r"\A[Pp]([0-9.,]{0,12}[YMWD]){0,3}([Tt]([0-9.,]{0,12}[HMS]){0,3})?\Z"),
            st.from_regex(r"\A([0-9]{0,9}[dhmsDHMS]){1,5}\Z"),
            st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=3).map(
                lambda digits: f"{digits}m"
            ),
            st.text(alphabet="PTYMWDHS0123456789.,-+ :e", max_size=20),
        )
    )


@PROPERTIES
@given(duration_texts())
@example("1\u0661m")  # an Arabic-Indic digit one among ASCII digits
@example("\u0669\u0660m")  # ninety minutes in Arabic-Indic digits
def test_a_duration_is_either_refused_with_a_message_or_a_positive_whole_number_of_seconds(text: str) -> None:
    try:
        duration = parse_duration(text)
    except InvalidInput as exc:
        assert str(exc)
        return
    assert text.strip().isascii(), f"{text!r} was read as {duration}"
    assert timedelta(0) < duration <= MAX_DURATION_ACCEPTED
    assert duration.microseconds == 0
    assert parse_duration(format_duration(int(duration.total_seconds()))) == duration


@PROPERTIES
@given(st.integers(0, int(MAX_DURATION_ACCEPTED.total_seconds())))
@example(0)
@example(1)
@example(60)
@example(86400)
@example(int(MAX_DURATION_ACCEPTED.total_seconds()))
def test_formatting_a_duration_round_trips_through_parsing(seconds: int) -> None:
    text = format_duration(seconds)
    assert text.startswith("P")
    assert parse_duration(text, allow_zero=True) == timedelta(seconds=seconds)
    assert parse_duration(text.lower(), allow_zero=True) == timedelta(seconds=seconds)
    if seconds == 0:
        with pytest.raises(InvalidInput, match="longer than zero"):
            parse_duration(text)
    else:
        assert parse_duration(text) == timedelta(seconds=seconds)


# -- bounds, as the API enforces them ----------------------------------------------------------------------

MAX_DURATION = 4 * 3600
MIN_DURATION = 60  # the `config` fixture's DRAWBRIDGE_MIN_DURATION


def _spellings(seconds: int) -> st.SearchStrategy[str]:
    forms = [f"PT{seconds}S", f"{seconds}s", format_duration(seconds)]
    if seconds % 60 == 0:
        forms += [f"{seconds // 60}m", f"PT{seconds // 60}M"]
    if seconds % 3600 == 0:
        forms += [f"{seconds // 3600}h", f"PT{seconds // 3600}H"]
    return st.sampled_from(forms)


_users = itertools.count()


@pytest.fixture
def bounded(registered: Callable[..., Any]) -> None:
    """The database `main`, allowing at most MAX_DURATION per request."""
    registered(max_duration=f"PT{MAX_DURATION}S")


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.one_of(
        st.integers(1, 2 * MAX_DURATION),
        st.sampled_from(
            [
                MIN_DURATION - 1,
                MIN_DURATION,
                MIN_DURATION + 1,
                MAX_DURATION - 1,
                MAX_DURATION,
                MAX_DURATION + 1,
            ]
        ),
    ).flatmap(lambda seconds: st.tuples(st.just(seconds), _spellings(seconds)))
)
def test_a_request_is_accepted_exactly_when_its_duration_is_within_the_bounds(
    client: FlaskClient, token_for: TokenFactory, bounded: None, case: tuple[int, str]
) -> None:
    seconds, spelled = case
    # A new person each time, so earlier examples' live requests never count against this one.
    headers = token_for(f"user{next(_users)}", "requester")
    response = client.post(
        "/access-requests",
        json={"database": "main", "cidr": "8.8.8.8", "duration": spelled, "reason": "INC-1"},
        headers=headers,
    )
    if MIN_DURATION <= seconds <= MAX_DURATION:
        assert response.status_code == 201, response.get_json()
        assert response.get_json()["duration"] == format_duration(seconds)
    else:
        assert response.status_code == 422, response.get_json()
        assert response.mimetype == "application/problem+json"
        assert "duration" in response.get_json()["errors"]


@pytest.mark.parametrize(("cidr", "duration"), [("8.8.8.8/\u00b2", "2h"), ("8.8.8.8", "\u0669\u0660m")])
def test_digits_of_other_scripts_in_a_request_get_a_422_problem_not_a_500(
    client: FlaskClient, token_for: TokenFactory, bounded: None, cidr: str, duration: str
) -> None:
    response = client.post(
        "/access-requests",
        json={"database": "main", "cidr": cidr, "duration": duration, "reason": "INC-1"},
        headers=token_for("alice", "requester"),
    )
    assert response.status_code == 422, response.get_json()
    assert response.mimetype == "application/problem+json"


def test_a_policy_read_back_from_the_api_can_be_sent_back_unchanged(
    client: FlaskClient, token_for: TokenFactory, registered: Callable[..., Any]
) -> None:
    admin = token_for("root", "admin")
    registered(self_extension="PT0S", warn_before="PT0S")
    policy = client.get("/databases/main", headers=admin).get_json()
    assert policy["self_extension"] == "PT0S" and policy["warn_before"] == "PT0S"
    fields = ("default_duration", "max_duration", "approval_window", "self_extension", "warn_before")
    response = client.patch("/databases/main", json={f: policy[f] for f in fields}, headers=admin)
    assert response.status_code == 200, response.get_json()
    assert {f: response.get_json()[f] for f in fields} == {f: policy[f] for f in fields}
