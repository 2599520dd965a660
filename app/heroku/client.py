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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from app.heroku.errors import (
    HerokuAuthError,
    HerokuBudgetReserved,
    HerokuError,
    HerokuNotFound,
    HerokuPermanentError,
    HerokuRateLimited,
    HerokuTransientError,
)

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


class RateBudget:
    """The account's Heroku API budget as Heroku last reported it (`RateLimit-Remaining`).

    Creates stop while fewer than `reserve` calls are left, reads at half that, deletes never (only Heroku's
    own 429 stops them), so closing access never starves behind opening it. Below `slow_below` every call
    is paced by up to `max_pause` seconds, more as the budget drains.
    """

    def __init__(self, *, reserve: int = 150, slow_below: int = 1000, max_pause: float = 1.0) -> None:
        self.reserve = reserve
        self.slow_below = slow_below
        self.max_pause = max_pause
        self.remaining: int | None = None
        self.observed_at = 0.0
        self._lock = threading.Lock()

    def observe(self, header: str | None) -> None:
        if header is None or not header.strip().isdigit():
            return
        with self._lock:
            self.remaining = int(header.strip())
            self.observed_at = time.monotonic()

    def stale(self, seconds: float = 30.0) -> bool:
        return time.monotonic() - self.observed_at > seconds

    def admits(self, priority: Priority) -> bool:
        with self._lock:
            if self.remaining is None or priority is Priority.DELETE:
                return True
            floor = self.reserve if priority is Priority.CREATE else self.reserve // 2
            return self.remaining > floor

    def pause(self) -> float:
        with self._lock:
            if self.remaining is None or self.remaining >= self.slow_below:
                return 0.0
            return self.max_pause * (1 - self.remaining / self.slow_below)


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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.budget = budget or RateBudget()
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
        failed ambiguously may have happened (the caller lists and matches before trying again)."""
        self._admit(priority, operation)
        attempts = self._retries if method in ("GET", "DELETE") else 1
        retrying = Retrying(
            stop=stop_after_attempt(max(1, attempts)),
            wait=wait_exponential_jitter(multiplier=self._backoff, max=self._backoff * 10),
            retry=retry_if_exception_type(HerokuTransientError),
            sleep=self._sleep,
            reraise=True,
        )
        response: httpx.Response | None = None
        for attempt in retrying:
            with attempt:
                pause = self.budget.pause()
                if pause:
                    self._sleep(pause)
                response = self._once(method, url, json=json, operation=operation)
        assert response is not None
        return response

    def _admit(self, priority: Priority, operation: str) -> None:
        if self.budget.admits(priority):
            return
        if self.budget.stale():
            self.refresh_budget()
            if self.budget.admits(priority):
                return
        raise HerokuBudgetReserved(
            f"{operation}: only {self.budget.remaining} Heroku API calls are left; "
            "the rest is kept for deleting rules"
        )

    def refresh_budget(self) -> None:
        """Ask Heroku what is left of the budget (this call costs nothing)."""
        try:
            response = self._once(
                "GET", f"{self._api_url}/account/rate-limits", json=None, operation="rate_limits"
            )
            data = response.json()
        except (HerokuError, ValueError):
            return
        if isinstance(data, dict) and isinstance(data.get("remaining"), int):
            self.budget.observe(str(data["remaining"]))

    def _once(self, method: str, url: str, *, json: Any, operation: str) -> httpx.Response:
        request_id = str(uuid.uuid4())
        headers = {"Request-Id": request_id}
        if json is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, url, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            log.warning("heroku %s timed out request_id=%s", operation, request_id)
            raise HerokuTransientError(
                f"{operation} timed out: {type(exc).__name__}", request_id=request_id
            ) from exc
        except httpx.TransportError as exc:
            log.warning("heroku %s failed to connect request_id=%s", operation, request_id)
            raise HerokuTransientError(
                f"{operation} could not reach Heroku: {type(exc).__name__}", request_id=request_id
            ) from exc
        self.budget.observe(response.headers.get("RateLimit-Remaining"))
        if response.headers.get(SIMULATOR_HEADER) and not self.simulated:
            self.simulated = True
            log.warning("SIMULATED HEROKU: %s is a simulator; no real access is granted or removed", url)
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
