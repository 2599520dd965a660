"""The httpx client for Heroku's Platform API (add-ons) and Data API (mTLS endpoint, IP rules, certificates).

Reading is tolerant on purpose: Heroku's mTLS API is unpublished, so error bodies may lack `id`, timestamps
come in two formats, and a delete may answer 200 with a body or 204 without one.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from app.clock import Clock, SystemClock
from app.heroku.errors import (
    HerokuAuthError,
    HerokuBudgetReserved,
    HerokuError,
    HerokuNotFound,
    HerokuPermanentError,
    HerokuRateLimited,
    HerokuTransientError,
)
from app.logs import current_request_id
from app.telemetry import record_heroku_call

log = logging.getLogger(__name__)

ACCEPT = "application/vnd.heroku+json; version=3"
USER_AGENT = "drawbridge/0.1 (+mTLS access manager)"
SIMULATOR_HEADER = "X-Heroku-Simulator"


@dataclass(frozen=True)
class Addon:
    id: uuid.UUID
    name: str
    app_id: str | None
    app_name: str | None
    service: str | None
    plan: str | None
    state: str | None


@dataclass(frozen=True)
class TlsEndpoint:
    app: str | None
    addon: str | None
    status: str
    enabled_by: str | None
    rule_count: int | None


@dataclass(frozen=True)
class IpRule:
    id: str
    cidr: str
    description: str
    status: str
    created_at: datetime | None
    updated_at: datetime | None

    @property
    def authorized(self) -> bool:
        return self.status.lower() == "authorized"


@dataclass(frozen=True)
class Certificate:
    id: str
    name: str | None
    status: str
    created_at: datetime | None
    expires_at: datetime | None


class Priority(enum.IntEnum):
    """Which calls may spend the last of the account's budget: deletes first, creates last."""

    CREATE = 0
    READ = 1
    DELETE = 2


@dataclass
class BudgetState:
    """What Drawbridge knows of the account's bucket of Heroku API calls.

    `tokens` is the bucket at `at` as Drawbridge counts it: what Heroku last reported, plus the refill since,
    less every call sent since. `issued` numbers the calls sent; `in_flight` holds those not answered yet
    (number → when sent), so a reading from Heroku can be adjusted for them; `reported` is the number of the
    newest call whose reading was used, so an older answer that arrives late cannot raise the count.
    """

    tokens: float
    at: datetime
    synced_at: datetime | None = None
    issued: int = 0
    reported: int = 0
    in_flight: dict[int, datetime] = field(default_factory=dict)

    def copy(self) -> BudgetState:
        return replace(self, in_flight=dict(self.in_flight))


Result = TypeVar("Result")


class BudgetStore(Protocol):
    """Where the count lives: in this process, or in the database for every process."""

    def update(
        self, initial: BudgetState, change: Callable[[BudgetState], tuple[BudgetState, Result]]
    ) -> Result:
        """Apply `change` atomically to the stored state (`initial` when none is stored yet); store the
        state it returns first and return the second."""
        ...


class MemoryBudgetStore:
    """The count of one process: enough for SQLite deployments (one process) and tests without a database."""

    def __init__(self) -> None:
        self._state: BudgetState | None = None
        self._lock = threading.Lock()

    def update(
        self, initial: BudgetState, change: Callable[[BudgetState], tuple[BudgetState, Result]]
    ) -> Result:
        with self._lock:
            state, result = change((self._state or initial).copy())
            self._state = state
            return result


@dataclass(frozen=True)
class Ticket:
    """One call the budget let through. `tokens` is what the count held before it; a free call (the
    rate-limit query) is not `counted`."""

    number: int
    tokens: float
    counted: bool = True


class RateBudget:
    """The Heroku account's API budget, counted on Drawbridge's side: a token bucket that mirrors Heroku's
    (4,500 calls, refilled at about 75 a minute), spent before each call is sent, and corrected by the
    `RateLimit-Remaining` of every answer.

    Creates stop while `reserve` calls or fewer are left, reads at half that, deletes only when the count
    says the bucket is empty, so closing access never starves behind opening it, and Heroku never has to
    answer 429 to a call Drawbridge counted on (unless something else spends the same account). Below
    `slow_below` every call is paced by up to `max_pause` seconds. `store` keeps the count: in this process,
    or in the database, where every worker process shares it.
    """

    def __init__(
        self,
        *,
        capacity: int = 4500,
        refill_per_minute: float = 75.0,
        reserve: int = 150,
        slow_below: int = 1000,
        max_pause: float = 1.0,
        stale_after: float = 10.0,
        in_flight_window: float = 60.0,
        store: BudgetStore | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.capacity = capacity
        self.refill_per_second = refill_per_minute / 60.0
        self.reserve = reserve
        self.slow_below = slow_below
        self.max_pause = max_pause
        self.stale_after = stale_after
        self.in_flight_window = in_flight_window
        self.store: BudgetStore = store or MemoryBudgetStore()
        self.clock: Clock = clock or SystemClock()

    # -- the count ---------------------------------------------------------------------------------------

    def floor(self, priority: Priority) -> int:
        """The count below which a call of this priority is not sent: it must leave at least this many."""
        if priority is Priority.CREATE:
            return self.reserve
        if priority is Priority.READ:
            return self.reserve // 2
        return 0

    def _initial(self, now: datetime) -> BudgetState:
        # Nothing known yet: assume a full bucket; the first answer's RateLimit-Remaining corrects it.
        return BudgetState(tokens=float(self.capacity), at=now)

    def _refill(self, state: BudgetState, now: datetime) -> BudgetState:
        elapsed = (now - state.at).total_seconds()
        if elapsed > 0:  # processes' clocks may disagree a little: time never runs backwards here
            state.tokens = min(float(self.capacity), state.tokens + elapsed * self.refill_per_second)
            state.at = now
        # A call unanswered for this long has been answered or abandoned (the client's timeout is shorter).
        cutoff = now - timedelta(seconds=self.in_flight_window)
        state.in_flight = {n: sent for n, sent in state.in_flight.items() if sent > cutoff}
        return state

    def _update(self, change: Callable[[BudgetState], tuple[BudgetState, Result]]) -> Result:
        now = self.clock.now()
        return self.store.update(self._initial(now), lambda state: change(self._refill(state, now)))

    def snapshot(self) -> BudgetState:
        """The count now (a copy)."""
        return self._update(lambda state: (state, state.copy()))

    @property
    def remaining(self) -> int:
        """Whole calls left, as counted now."""
        return int(self.snapshot().tokens)

    def admits(self, priority: Priority) -> bool:
        """Whether a call of `priority` would be let through now (nothing is spent)."""
        return self.snapshot().tokens - 1 >= self.floor(priority)

    def stale(self) -> bool:
        """Whether Heroku last reported the budget more than `stale_after` seconds ago (or never)."""
        synced = self.snapshot().synced_at
        return synced is None or (self.clock.now() - synced).total_seconds() > self.stale_after

    def wait_for(self, priority: Priority) -> float:
        """Seconds of refill until a call of `priority` would be let through."""
        missing = self.floor(priority) + 1 - self.snapshot().tokens
        if missing <= 0:
            return 0.0
        return missing / self.refill_per_second if self.refill_per_second > 0 else float("inf")

    def pause(self, tokens: float | None = None) -> float:
        """Seconds to wait before a call, more as the budget drains."""
        left = self.snapshot().tokens if tokens is None else tokens
        if left >= self.slow_below:
            return 0.0
        return self.max_pause * (1 - max(0.0, left) / self.slow_below)

    # -- spending and correcting -------------------------------------------------------------------------

    def acquire(self, priority: Priority) -> Ticket | None:
        """Spend one call of the budget for a call about to be sent; None (nothing spent) when a call of
        this priority must not be sent now."""

        def change(state: BudgetState) -> tuple[BudgetState, Ticket | None]:
            before = state.tokens
            if before - 1 < self.floor(priority):
                return state, None
            state.tokens = before - 1
            state.issued += 1
            state.in_flight[state.issued] = state.at
            return state, Ticket(number=state.issued, tokens=before)

        return self._update(change)

    def peek(self) -> Ticket:
        """A ticket for a free call (it spends nothing), so its answer can correct the count."""
        return self._update(lambda state: (state, Ticket(state.issued, state.tokens, counted=False)))

    def settle(self, ticket: Ticket, header: str | None, *, limited: bool = False) -> None:
        """Record the answer to the call of `ticket`, with its `RateLimit-Remaining` (a 429 without one
        means nothing is left).

        Heroku's reading counts every call it has answered, not those still on their way, so the calls in
        flight are taken off it. A reading below the count always lowers it (someone else spends this
        account, or Heroku refills slower than counted); one above it raises it only if no newer call has
        reported yet, since an answer that arrives late is older news."""
        remaining = _remaining(header)
        if remaining is None and limited:
            remaining = 0

        def change(state: BudgetState) -> tuple[BudgetState, int | None]:
            if ticket.counted:
                state.in_flight.pop(ticket.number, None)
            if remaining is None:
                return state, None
            counted = int(state.tokens)
            in_flight = len(state.in_flight)
            if remaining < counted:
                state.tokens = float(max(0, remaining - in_flight))
            elif ticket.number >= state.reported:
                # The call itself is counted once more: a margin for answers that overtook each other.
                margin = in_flight + (1 if ticket.counted else 0)
                state.tokens = max(state.tokens, float(min(self.capacity, remaining - margin)))
            state.reported = max(state.reported, ticket.number)
            state.synced_at = state.at
            return state, counted

        counted = self._update(change)
        if limited and counted is not None and ticket.counted and ticket.tokens >= 1:
            log.warning(
                "Heroku answered 429 although Drawbridge counted %.0f calls left; something else may be "
                "spending this account's API budget",
                ticket.tokens,
            )

    def observe(self, header: str | None) -> None:
        """Take a reading of the budget that no call of ours is waiting for (the newest news)."""
        self.settle(self.peek(), header)


def _worth_retrying(exc: BaseException) -> bool:
    # A call the budget held back is not sent again at once: the count will not have changed.
    return isinstance(exc, HerokuTransientError) and not isinstance(exc, HerokuBudgetReserved)


def _remaining(header: str | None) -> int | None:
    if header is None or not header.strip().isdigit():
        return None
    return int(header.strip())


def parse_timestamp(value: object) -> datetime | None:
    """Parse either timestamp format Heroku has used; None (never an error) for anything else."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    for candidate in (text, text.replace(" +0000", "+00:00").replace(" ", "T", 1)):
        try:
            parsed = datetime.fromisoformat(candidate.replace("Z", "+00:00"))
        except ValueError:
            continue
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    for fmt in ("%Y-%m-%d %H:%M:%S %z", "%Y-%m-%dT%H:%M:%S%z", "%Y/%m/%d %H:%M:%S %z"):
        try:
            return datetime.strptime(text, fmt).astimezone(UTC)
        except ValueError:
            continue
    return None


def _str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _rule(data: Any) -> IpRule:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise HerokuPermanentError("Heroku returned an IP rule without an id")
    return IpRule(
        id=data["id"],
        cidr=_str(data, "cidr") or "",
        description=_str(data, "description") or "",
        status=_str(data, "status") or "unknown",
        created_at=parse_timestamp(data.get("created_at")),
        updated_at=parse_timestamp(data.get("updated_at")),
    )


def _certificate(data: Any) -> Certificate:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise HerokuPermanentError("Heroku returned a certificate without an id")
    return Certificate(
        id=data["id"],
        name=_str(data, "name"),
        status=_str(data, "status") or "unknown",
        created_at=parse_timestamp(data.get("created_at")),
        expires_at=parse_timestamp(data.get("expires_at")),
    )


class HerokuClient:
    """One instance per process; it owns a pooled httpx.Client with timeouts set once."""

    def __init__(
        self,
        *,
        token: str,
        api_url: str,
        data_api_url: str,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        budget: RateBudget | None = None,
        budget_wait: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.budget = budget or RateBudget()
        self._budget_wait = budget_wait
        self.simulated = False
        self._retries = retries
        self._backoff = backoff
        self._sleep = sleep
        self._api_url = api_url.rstrip("/")
        self._data_api_url = data_api_url.rstrip("/")
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            headers={
                "Accept": ACCEPT,
                "User-Agent": USER_AGENT,
                "Authorization": f"Bearer {token}",
            },
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    # -- transport ---------------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        operation: str,
        priority: Priority = Priority.READ,
    ) -> httpx.Response:
        """One logical call. Idempotent ones (GET, DELETE) are retried on transient errors with
        exponential backoff and jitter, inside a small budget; a create never is, because a create that
        failed ambiguously may have happened (the caller lists and matches before trying again). Every
        attempt spends one call of the budget, as it does at Heroku."""
        attempts = self._retries if method in ("GET", "DELETE") else 1
        retrying = Retrying(
            stop=stop_after_attempt(max(1, attempts)),
            wait=wait_exponential_jitter(multiplier=self._backoff, max=self._backoff * 10),
            retry=retry_if_exception(_worth_retrying),
            sleep=self._sleep,
            reraise=True,
        )
        response: httpx.Response | None = None
        for attempt in retrying:
            with attempt:
                ticket = self._admit(priority, operation)
                pause = self.budget.pause(ticket.tokens)
                if pause:
                    self._sleep(pause)
                response = self._once(method, url, json=json, operation=operation, ticket=ticket)
        assert response is not None
        return response

    def _admit(self, priority: Priority, operation: str) -> Ticket:
        """Spend one call of the budget, or raise HerokuBudgetReserved without calling Heroku. A refusal
        on a count Heroku has not confirmed lately is checked with Heroku first (for free), and a delete
        waits up to `budget_wait` seconds for the refill rather than a whole backoff."""
        ticket = self.budget.acquire(priority)
        if ticket is None and self.budget.stale():
            self.refresh_budget()
            ticket = self.budget.acquire(priority)
        if ticket is None and priority is Priority.DELETE:
            wait = self.budget.wait_for(priority)
            if wait <= self._budget_wait:
                self._sleep(wait)
                ticket = self.budget.acquire(priority)
        if ticket is not None:
            return ticket
        if priority is Priority.DELETE:
            raise HerokuBudgetReserved(
                f"{operation}: the Heroku API budget is spent by Drawbridge's count; waiting for the refill"
            )
        raise HerokuBudgetReserved(
            f"{operation}: only {self.budget.remaining} Heroku API calls are left; "
            "the rest is kept for deleting rules"
        )

    def can_send(self, priority: Priority) -> bool:
        """Whether the budget would let a call of `priority` through now (nothing is spent). A refusal on a
        count Heroku has not confirmed lately is checked with Heroku first, for free."""
        if self.budget.admits(priority):
            return True
        if self.budget.stale():
            self.refresh_budget()
            return self.budget.admits(priority)
        return False

    def refresh_budget(self) -> None:
        """Ask Heroku what is left of the budget (this call costs nothing)."""
        ticket = self.budget.peek()
        try:
            response = self._once(
                "GET", f"{self._api_url}/account/rate-limits", json=None, operation="rate_limits"
            )
            data = response.json()
        except (HerokuError, ValueError):
            return
        if isinstance(data, dict) and isinstance(data.get("remaining"), int):
            self.budget.settle(ticket, str(data["remaining"]))

    def _once(
        self, method: str, url: str, *, json: Any, operation: str, ticket: Ticket | None = None
    ) -> httpx.Response:
        """Send one request. The answer settles `ticket` with the budget; a call that got no answer stays
        counted as in flight for a while, since it may still reach Heroku."""
        # The id of the HTTP request or worker run being served, so Heroku's logs and ours line up.
        request_id = current_request_id() or str(uuid.uuid4())
        headers = {"Request-Id": request_id}
        if json is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, url, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            record_heroku_call(operation, "timeout")
            log.warning("heroku %s timed out request_id=%s", operation, request_id)
            raise HerokuTransientError(
                f"{operation} timed out: {type(exc).__name__}", request_id=request_id
            ) from exc
        except httpx.TransportError as exc:
            record_heroku_call(operation, "unreachable")
            log.warning("heroku %s failed to connect request_id=%s", operation, request_id)
            raise HerokuTransientError(
                f"{operation} could not reach Heroku: {type(exc).__name__}", request_id=request_id
            ) from exc
        if ticket is not None:
            self.budget.settle(
                ticket, response.headers.get("RateLimit-Remaining"), limited=response.status_code == 429
            )
        if response.headers.get(SIMULATOR_HEADER) and not self.simulated:
            self.simulated = True
            log.warning("SIMULATED HEROKU: %s is a simulator; no real access is granted or removed", url)
        record_heroku_call(operation, str(response.status_code))
        log.info("heroku %s status=%s request_id=%s", operation, response.status_code, request_id)
        if response.is_success:
            return response
        raise self._error(response, operation, request_id)

    @staticmethod
    def _error(response: httpx.Response, operation: str, request_id: str) -> HerokuError:
        error_id: str | None = None
        message = response.reason_phrase or "error"
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            error_id = body.get("id") if isinstance(body.get("id"), str) else None
            if isinstance(body.get("message"), str):
                message = body["message"]
        status = response.status_code
        text = f"{operation}: {message}"
        kwargs: dict[str, Any] = {"status": status, "error_id": error_id, "request_id": request_id}
        if status == 429:
            return HerokuRateLimited(text, **kwargs)
        if status >= 500:
            return HerokuTransientError(text, **kwargs)
        if status == 404:
            return HerokuNotFound(text, **kwargs)
        if status in (401, 403):
            return HerokuAuthError(text, **kwargs)
        return HerokuPermanentError(text, **kwargs)

    @staticmethod
    def _json(response: httpx.Response, operation: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise HerokuTransientError(
                f"{operation}: Heroku answered {response.status_code} with a body that is not JSON",
                status=response.status_code,
            ) from None

    def _data(self, db: str, suffix: str = "") -> str:
        return f"{self._data_api_url}/postgres/v0/databases/{quote(db, safe='')}/tls-endpoint{suffix}"

    # -- operations --------------------------------------------------------------------------------------

    def get_addon(self, *, app: str, addon: str) -> Addon:
        """Look up an add-on of an app (Platform API). Raises HerokuNotFound if either does not exist."""
        url = f"{self._api_url}/apps/{quote(app, safe='')}/addons/{quote(addon, safe='')}"
        response = self._call("GET", url, operation="addon_lookup")
        data = self._json(response, "addon_lookup")
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise HerokuPermanentError("addon_lookup: Heroku returned an add-on without an id")
        try:
            addon_id = uuid.UUID(data["id"])
        except ValueError:
            raise HerokuPermanentError("addon_lookup: the add-on id is not a UUID") from None
        app_data: dict[str, Any] = data["app"] if isinstance(data.get("app"), dict) else {}
        service: dict[str, Any] = data["addon_service"] if isinstance(data.get("addon_service"), dict) else {}
        plan: dict[str, Any] = data["plan"] if isinstance(data.get("plan"), dict) else {}
        return Addon(
            id=addon_id,
            name=_str(data, "name") or addon,
            app_id=_str(app_data, "id"),
            app_name=_str(app_data, "name"),
            service=_str(service, "name"),
            plan=_str(plan, "name"),
            state=_str(data, "state"),
        )

    def get_tls_endpoint(self, *, db: str) -> TlsEndpoint:
        """mTLS configuration of a database (Data API). HerokuNotFound means mTLS is not enabled."""
        response = self._call("GET", self._data(db), operation="mtls_status")
        data = self._json(response, "mtls_status")
        if not isinstance(data, dict):
            raise HerokuPermanentError("mtls_status: Heroku returned a config that is not an object")
        rules = data.get("active_ip_rules")
        return TlsEndpoint(
            app=_str(data, "app"),
            addon=_str(data, "addon"),
            status=_str(data, "status") or "unknown",
            enabled_by=_str(data, "enabled_by"),
            rule_count=len(rules) if isinstance(rules, list) else None,
        )

    def list_ip_rules(self, *, db: str, priority: Priority = Priority.READ) -> list[IpRule]:
        """Every IP rule of a database, Drawbridge's and others'. Listing in order to delete may pass
        Priority.DELETE so it is not refused when the budget runs low."""
        response = self._call(
            "GET", self._data(db, "/ip-rules"), operation="ip_rules_list", priority=priority
        )
        data = self._json(response, "ip_rules_list")
        if not isinstance(data, list):
            raise HerokuPermanentError("ip_rules_list: Heroku returned something other than a list")
        return [_rule(item) for item in data]

    def create_ip_rule(self, *, db: str, cidr: str, description: str) -> IpRule:
        """Create a rule. Not idempotent: after an ambiguous failure, list and match on `description`."""
        response = self._call(
            "POST",
            self._data(db, "/ip-rules"),
            json={"cidr": cidr, "description": description},
            operation="ip_rule_create",
            priority=Priority.CREATE,
        )
        return _rule(self._json(response, "ip_rule_create"))

    def get_ip_rule(self, *, db: str, rule_id: str) -> IpRule:
        response = self._call(
            "GET", self._data(db, f"/ip-rules/{quote(rule_id, safe='')}"), operation="ip_rule_get"
        )
        return _rule(self._json(response, "ip_rule_get"))

    def delete_ip_rule(self, *, db: str, rule_id: str) -> bool:
        """Delete a rule; True if Heroku deleted it now, False if it was already gone (404)."""
        try:
            self._call(
                "DELETE",
                self._data(db, f"/ip-rules/{quote(rule_id, safe='')}"),
                operation="ip_rule_delete",
                priority=Priority.DELETE,
            )
        except HerokuNotFound:
            return False
        return True

    def list_certificates(self, *, db: str) -> list[Certificate]:
        response = self._call("GET", self._data(db, "/certificates"), operation="certificates_list")
        data = self._json(response, "certificates_list")
        if not isinstance(data, list):
            raise HerokuPermanentError("certificates_list: Heroku returned something other than a list")
        return [_certificate(item) for item in data]

    def get_certificate(self, *, db: str, certificate_id: str) -> Certificate:
        response = self._call(
            "GET",
            self._data(db, f"/certificates/{quote(certificate_id, safe='')}"),
            operation="certificate_get",
        )
        return _certificate(self._json(response, "certificate_get"))
