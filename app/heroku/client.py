"""The httpx client for Heroku's Platform API (add-ons) and Data API (mTLS endpoint, IP rules, certificates).

Reading is tolerant on purpose: Heroku's mTLS API is unpublished, so error bodies may lack `id`, timestamps
come in two formats, and a delete may answer 200 with a body or 204 without one.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from app.heroku.errors import (
    HerokuAuthError,
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
    ) -> None:
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
    ) -> httpx.Response:
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

    def list_ip_rules(self, *, db: str) -> list[IpRule]:
        """Every IP rule of a database, Drawbridge's and others'."""
        response = self._call("GET", self._data(db, "/ip-rules"), operation="ip_rules_list")
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
