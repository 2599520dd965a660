"""A simulator of Heroku's Platform API (add-on lookup) and Data API (mTLS endpoint, IP rules, certificates).

It is a WSGI app speaking the same wire protocol, so Drawbridge's real httpx client runs against it in tests
and in `--simulate` mode. Every behaviour that `heroku-mtls-api.md` marks as unverified has a switch in
`Settings`, and so has every fault Drawbridge must survive. Each call is logged for tests to count.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from app.clock import Clock

SIMULATOR_HEADER = "X-Heroku-Simulator"
FAULT_HEADER = "X-Simulator-Fault"

Fault = Literal["500", "502", "503", "429", "timeout", "slow", "ambiguous_500", "ambiguous_timeout"]
CONTROL_PREFIX = "/__simulator/"


@dataclass
class Settings:
    """Switches for Heroku's unverified behaviours and for injected faults."""

    authorize_after: float = 0.0
    """Seconds (on the simulator's clock) a new rule stays `Authorizing`."""
    rule_limit: int = 60
    duplicate_cidr: Literal["reject", "allow"] = "reject"
    """Creating a CIDR that already has a rule: 422, or a second rule."""
    readd_window: float = 0.0
    """Seconds after a CIDR's rule is deleted during which re-creating it answers 500."""
    timestamp_format: Literal["iso", "heroku"] = "iso"
    """`2020-09-04T01:29:55.209+00:00` or `2024-07-31 01:16:17 +0000`."""
    delete_answer: Literal[200, 204] = 200
    create_status: int = 201
    errors_with_id: bool = True
    """False drops `id` from error bodies, as some Data API errors do."""
    fault_rate: float = 0.0
    """Probability that a call fails with one of `fault_mix`."""
    fault_mix: tuple[Fault, ...] = ("500", "503", "429", "timeout", "ambiguous_500")
    """`429` is a refusal that spends nothing (Heroku's own 429, from an empty bucket, needs no fault);
    `slow` answers correctly, `slow_fault_seconds` late; the `ambiguous_` ones do the work, then fail."""
    slow_seconds: float = 0.0
    """Real seconds every answer is delayed (for loopback timeout tests)."""
    slow_fault_seconds: float = 1.0
    """Real seconds a `slow` fault delays its answer."""
    timeout_seconds: float = 0.0
    """Real seconds a timeout fault holds its answer: over a socket, longer than the client waits."""
    bucket_capacity: int = 4500
    bucket_refill_per_minute: float = 75.0
    bucket_drain_per_minute: float = 0.0
    """Calls per minute something else spends from the same account's bucket (a draining bucket)."""
    seed: int | None = None


@dataclass
class SimRule:
    id: str
    cidr: str
    description: str
    created_at: datetime
    updated_at: datetime
    authorized_at: datetime


@dataclass
class SimCertificate:
    id: str
    name: str
    status: str
    created_at: datetime
    expires_at: datetime | None


@dataclass
class SimAddon:
    id: str
    name: str
    app_name: str
    app_id: str
    service: str = "heroku-postgresql"
    plan: str = "heroku-postgresql:private-0"
    mtls_status: str | None = "Operational"
    enabled_by: str = "owner@example.com"
    rules: dict[str, SimRule] = field(default_factory=dict)
    certificates: dict[str, SimCertificate] = field(default_factory=dict)
    deleted_cidrs: dict[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    operation: str
    status: int
    at: datetime
    request_id: str | None
    fault: str | None = None


class SimulatedTimeout(Exception):
    """Raised by SimulatorTransport where a real client would have timed out."""


class Simulator:
    """The WSGI app. Thread-safe: one lock guards all state."""

    def __init__(
        self, *, clock: Clock, token: str = "simulator-token", settings: Settings | None = None
    ) -> None:
        self.clock = clock
        self.token = token
        self.settings = settings or Settings()
        self.addons: dict[str, SimAddon] = {}
        self.calls: list[Call] = []
        self.created: list[SimRule] = []
        """Every rule ever created, deleted ones included, in order."""
        self.deleted: list[str] = []
        """Ids of rules deleted, in order."""
        self._scripted: dict[str, deque[Fault]] = {}
        self._lock = threading.RLock()
        self._rng = random.Random(self.settings.seed)
        self._bucket = float(self.settings.bucket_capacity)
        self._bucket_at = clock.now()
        self._routes = Map(
            [
                Rule("/apps/<app>/addons/<addon>", endpoint="addon_lookup", methods=["GET"]),
                Rule("/addons/<addon>", endpoint="addon_lookup_global", methods=["GET"]),
                Rule("/account/rate-limits", endpoint="rate_limits", methods=["GET"]),
                Rule(
                    "/postgres/v0/databases/<db>/tls-endpoint",
                    endpoint="mtls_status",
                    methods=["GET"],
                ),
                Rule(
                    "/postgres/v0/databases/<db>/tls-endpoint/ip-rules",
                    endpoint="ip_rules",
                    methods=["GET", "POST"],
                ),
                Rule(
                    "/postgres/v0/databases/<db>/tls-endpoint/ip-rules/<rule_id>",
                    endpoint="ip_rule",
                    methods=["GET", "DELETE"],
                ),
                Rule(
                    "/postgres/v0/databases/<db>/tls-endpoint/certificates",
                    endpoint="certificates_list",
                    methods=["GET"],
                ),
                Rule(
                    "/postgres/v0/databases/<db>/tls-endpoint/certificates/<cert_id>",
                    endpoint="certificate_get",
                    methods=["GET"],
                ),
            ],
            strict_slashes=False,
        )

    # -- setup and inspection (for tests and --simulate) ----------------------------------------------

    def add_addon(
        self,
        *,
        app: str,
        name: str,
        addon_id: str | None = None,
        service: str = "heroku-postgresql",
        plan: str = "heroku-postgresql:private-0",
        mtls_status: str | None = "Operational",
    ) -> SimAddon:
        now = self.clock.now()
        addon = SimAddon(
            id=addon_id or str(uuid.uuid4()),
            name=name,
            app_name=app,
            app_id=str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{app}.herokuapp.com")),
            service=service,
            plan=plan,
            mtls_status=mtls_status,
        )
        cert = SimCertificate(
            id=str(uuid.uuid4()),
            name=f"{name}.mtls.example.com",
            status="ready",
            created_at=now,
            expires_at=now + timedelta(days=365),
        )
        addon.certificates[cert.id] = cert
        with self._lock:
            self.addons[addon.id] = addon
        return addon

    def seed_demo(self) -> SimAddon:
        """The add-on the README walk-through registers: app `demo-app`, add-on `postgresql-demo`."""
        demo_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "drawbridge-simulator:demo-app/postgresql-demo"))
        return self.add_addon(app="demo-app", name="postgresql-demo", addon_id=demo_id)

    def add_foreign_rule(self, addon: SimAddon, *, cidr: str, description: str = "") -> SimRule:
        """A rule created by someone else (the Heroku CLI, a colleague): Drawbridge must not touch it."""
        now = self.clock.now()
        rule = SimRule(str(uuid.uuid4()), cidr, description, now, now, now)
        with self._lock:
            addon.rules[rule.id] = rule
        return rule

    def rules(self, addon: SimAddon) -> list[SimRule]:
        with self._lock:
            return list(addon.rules.values())

    def spend(self, tokens: float) -> float:
        """Something else spends `tokens` of the account's bucket now; returns what is left."""
        with self._lock:
            self._refill()
            self._bucket = max(0.0, self._bucket - tokens)
            return self._bucket

    def script(self, operation: str, *faults: Fault) -> None:
        """Make the next calls of `operation` fail as given, in order (deterministic fault injection)."""
        with self._lock:
            self._scripted.setdefault(operation, deque()).extend(faults)

    def count(self, operation: str | None = None, *, status: int | None = None) -> int:
        with self._lock:
            return sum(
                1
                for c in self.calls
                if (operation is None or c.operation == operation) and (status is None or c.status == status)
            )

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()
            self.created.clear()
            self.deleted.clear()

    # -- WSGI ---------------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        response = self._handle(request)
        return response(environ, start_response)

    def _handle(self, request: Request) -> Response:
        if request.path.startswith(CONTROL_PREFIX):
            return self._control(request)
        adapter = self._routes.bind_to_environ(request.environ)
        operation = "unknown"
        try:
            endpoint, args = adapter.match()
            operation = self._operation(str(endpoint), request.method)
            with self._lock:
                response = self._dispatch(request, operation, str(endpoint), dict(args))
        except (NotFound, MethodNotAllowed) as exc:
            response = self._error(exc.code or 404, "not_found", "Not found.")
        except HTTPException as exc:  # pragma: no cover - defensive
            response = self._error(exc.code or 400, "bad_request", exc.description or "Bad request.")
        delay = self.settings.slow_seconds
        fault = response.headers.get(FAULT_HEADER)
        if fault == "slow":
            delay += self.settings.slow_fault_seconds
        elif fault in ("timeout", "ambiguous_timeout"):
            delay += self.settings.timeout_seconds
        if delay > 0:
            time.sleep(delay)  # outside the lock: other calls go on meanwhile
        response.headers[SIMULATOR_HEADER] = "1"
        with self._lock:
            self.calls.append(
                Call(
                    method=request.method,
                    path=request.path,
                    operation=operation,
                    status=response.status_code,
                    at=self.clock.now(),
                    request_id=request.headers.get("Request-Id"),
                    fault=response.headers.get(FAULT_HEADER),
                )
            )
        return response

    # -- control, for campaigns that run the simulator as its own process ----------------------------------

    def _control(self, request: Request) -> Response:
        """Inspect and steer the simulator over HTTP, with its token; these calls are neither logged nor
        charged. `GET state`; `PATCH settings`; `POST addons` {app, name}, `foreign-rules`
        {addon, cidr, description}, `spend` {tokens}."""
        if not self._authorized(request):
            return self._error(401, "unauthorized", "Invalid credentials provided.")
        action = (request.method, request.path[len(CONTROL_PREFIX) :].strip("/"))
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            return self._error(400, "bad_request", "Invalid JSON.")
        if not isinstance(body, dict):
            return self._error(400, "bad_request", "A JSON object is expected.")
        try:
            with self._lock:
                if action == ("GET", "state"):
                    return self._json(self._state())
                if action == ("PATCH", "settings"):
                    self._change_settings(body)
                    return self._json(self._settings_json())
                if action == ("POST", "addons"):
                    addon = self.add_addon(app=str(body["app"]), name=str(body["name"]))
                    return self._json(self._addon_json(addon), 201)
                if action == ("POST", "foreign-rules"):
                    found = self._find(str(body["addon"]))
                    if found is None:
                        return self._error(404, "not_found", "Couldn't find that add-on.")
                    rule = self.add_foreign_rule(
                        found, cidr=str(body["cidr"]), description=str(body.get("description", ""))
                    )
                    return self._json(self._raw_rule(rule, found), 201)
                if action == ("POST", "spend"):
                    return self._json({"remaining": self.spend(float(body["tokens"]))})
        except (KeyError, TypeError, ValueError) as exc:
            return self._error(422, "unprocessable_entity", f"Invalid control request: {exc}")
        return self._error(404, "not_found", "Not found.")

    def _change_settings(self, changes: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(Settings)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown settings {unknown}")
        for name, value in changes.items():
            current = getattr(self.settings, name)
            if name == "fault_mix":
                value = tuple(str(v) for v in value)
            elif isinstance(current, bool) or isinstance(current, str):
                value = type(current)(value)
            elif isinstance(current, (int, float)) and not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number")
            setattr(self.settings, name, value)
            if name == "seed":
                self._rng = random.Random(value)
        self._refill()
        self._bucket = min(self._bucket, float(self.settings.bucket_capacity))

    def _settings_json(self) -> dict[str, Any]:
        return {f.name: getattr(self.settings, f.name) for f in fields(Settings)}

    def _raw_rule(self, rule: SimRule, addon: SimAddon | None = None) -> dict[str, Any]:
        return {
            "id": rule.id,
            "addon": addon.id if addon else None,
            "cidr": rule.cidr,
            "description": rule.description,
            "created_at": rule.created_at.isoformat(),
            "authorized_at": rule.authorized_at.isoformat(),
        }

    def _state(self) -> dict[str, Any]:
        """Everything a campaign checks afterwards: the bucket, the rules now, every rule ever created and
        deleted, and every call with its answer."""
        self._refill()
        return {
            "bucket": self._bucket,
            "settings": self._settings_json(),
            "addons": [{"id": a.id, "name": a.name, "app": a.app_name} for a in self.addons.values()],
            "rules": [self._raw_rule(r, a) for a in self.addons.values() for r in a.rules.values()],
            "created": [self._raw_rule(r) for r in self.created],
            "deleted": list(self.deleted),
            "calls": [
                {
                    "method": c.method,
                    "path": c.path,
                    "operation": c.operation,
                    "status": c.status,
                    "at": c.at.isoformat(),
                    "request_id": c.request_id,
                    "fault": c.fault,
                }
                for c in self.calls
            ],
        }

    @staticmethod
    def _operation(endpoint: str, method: str) -> str:
        if endpoint == "ip_rules":
            return "ip_rules_list" if method == "GET" else "ip_rule_create"
        if endpoint == "ip_rule":
            return "ip_rule_get" if method == "GET" else "ip_rule_delete"
        if endpoint == "addon_lookup_global":
            return "addon_lookup"
        return endpoint

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return value == self.token
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value).decode()
            except ValueError:
                return False
            return decoded.partition(":")[2] == self.token
        return False

    def _refill(self) -> None:
        now = self.clock.now()
        elapsed = (now - self._bucket_at).total_seconds()
        self._bucket_at = now
        net = self.settings.bucket_refill_per_minute - self.settings.bucket_drain_per_minute
        refill = max(0.0, elapsed) * net / 60.0
        self._bucket = max(0.0, min(float(self.settings.bucket_capacity), self._bucket + refill))

    def _take_token(self) -> int | None:
        """Spend one token from the account's bucket; None when it is empty."""
        self._refill()
        if self._bucket < 1:
            return None
        self._bucket -= 1
        return int(self._bucket)

    def _next_fault(self, operation: str) -> Fault | None:
        queue = self._scripted.get(operation)
        if queue:
            return queue.popleft()
        if self.settings.fault_rate and self._rng.random() < self.settings.fault_rate:
            mix = self.settings.fault_mix
            if operation != "ip_rule_create":
                mix = tuple(f for f in mix if not f.startswith("ambiguous")) or ("500",)
            return self._rng.choice(mix)
        return None

    def _dispatch(self, request: Request, operation: str, endpoint: str, args: dict[str, str]) -> Response:
        if not self._authorized(request):
            return self._error(401, "unauthorized", "Invalid credentials provided.")
        if operation == "rate_limits":
            self._refill()
            return self._json({"remaining": int(self._bucket)})
        remaining = self._take_token()
        if remaining is None:
            response = self._error(429, "rate_limit", "Your account reached the API rate limit.")
            response.headers["RateLimit-Remaining"] = "0"
            return response
        fault = self._next_fault(operation)
        if fault == "429":
            self._bucket += 1  # refused before it counted
            remaining = int(self._bucket)
        faulty = self._fault_response(fault)
        if faulty is not None and not (fault or "").startswith("ambiguous"):
            response = faulty
        else:
            # An ambiguous fault performs the operation, then answers as if it had failed.
            response = getattr(self, f"_op_{operation}")(request, **args)
            if faulty is not None and response.status_code < 400:
                response = faulty
        if fault == "slow":
            response.headers[FAULT_HEADER] = fault
        response.headers["RateLimit-Remaining"] = str(remaining)
        return response

    def _fault_response(self, fault: Fault | None) -> Response | None:
        if fault is None:
            return None
        if fault == "slow":
            return None
        if fault in ("timeout", "ambiguous_timeout"):
            response = self._error(504, "timeout", "Simulated timeout.")
        elif fault == "429":
            response = self._error(429, "rate_limit", "Your account reached the API rate limit.")
        else:
            status = 500 if fault == "ambiguous_500" else int(fault)
            response = self._error(status, "server_error", "Internal server error.")
        response.headers[FAULT_HEADER] = fault
        return response

    # -- rendering ----------------------------------------------------------------------------------------

    def _ts(self, moment: datetime | None) -> str | None:
        if moment is None:
            return None
        if self.settings.timestamp_format == "heroku":
            return moment.strftime("%Y-%m-%d %H:%M:%S +0000")
        return moment.isoformat(timespec="milliseconds")

    @staticmethod
    def _json(body: Any, status: int = 200) -> Response:
        return Response(json.dumps(body), status=status, mimetype="application/json")

    def _error(self, status: int, error_id: str, message: str) -> Response:
        body: dict[str, str] = {"message": message}
        if self.settings.errors_with_id:
            body = {"id": error_id, **body}
        return self._json(body, status)

    def _rule_json(self, rule: SimRule) -> dict[str, Any]:
        status = "Authorized" if self.clock.now() >= rule.authorized_at else "Authorizing"
        return {
            "id": rule.id,
            "cidr": rule.cidr,
            "description": rule.description,
            "status": status,
            "created_at": self._ts(rule.created_at),
            "updated_at": self._ts(max(rule.updated_at, min(rule.authorized_at, self.clock.now()))),
        }

    def _find(self, db: str) -> SimAddon | None:
        if db in self.addons:
            return self.addons[db]
        return next((a for a in self.addons.values() if a.name == db), None)

    def _mtls(self, db: str) -> SimAddon | Response:
        addon = self._find(db)
        if addon is None:
            return self._error(404, "not_found", "Couldn't find that database.")
        if addon.mtls_status is None:
            return self._error(404, "not_found", "mTLS is not enabled for this database.")
        return addon

    # -- Platform API ---------------------------------------------------------------------------------

    def _addon_json(self, addon: SimAddon) -> dict[str, Any]:
        return {
            "id": addon.id,
            "name": addon.name,
            "app": {"id": addon.app_id, "name": addon.app_name},
            "addon_service": {"name": addon.service},
            "plan": {"name": addon.plan},
            "state": "provisioned",
        }

    def _op_addon_lookup(self, request: Request, addon: str, app: str | None = None) -> Response:
        found = self._find(addon)
        if found is None or (app is not None and found.app_name != app):
            return self._error(404, "not_found", "Couldn't find that add-on.")
        return self._json(self._addon_json(found))

    # -- Data API -------------------------------------------------------------------------------------

    def _op_mtls_status(self, request: Request, db: str) -> Response:
        addon = self._mtls(db)
        if isinstance(addon, Response):
            return addon
        return self._json(
            {
                "app": addon.app_name,
                "addon": addon.name,
                "status": addon.mtls_status,
                "enabled_by": addon.enabled_by,
                "certificate_authority_chain": "-----BEGIN CERTIFICATE-----\nSIMULATED\n"
                "-----END CERTIFICATE-----\n",
                "active_ip_rules": [self._rule_json(r) for r in addon.rules.values()],
            }
        )

    def _op_ip_rules_list(self, request: Request, db: str) -> Response:
        addon = self._mtls(db)
        if isinstance(addon, Response):
            return addon
        return self._json([self._rule_json(r) for r in addon.rules.values()])

    def _op_ip_rule_create(self, request: Request, db: str) -> Response:
        addon = self._mtls(db)
        if isinstance(addon, Response):
            return addon
        if addon.mtls_status != "Operational":
            return self._error(422, "unprocessable_entity", "mTLS is not operational yet.")
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            return self._error(400, "bad_request", "Invalid JSON.")
        cidr = body.get("cidr") if isinstance(body, dict) else None
        description = body.get("description", "") if isinstance(body, dict) else ""
        if not isinstance(cidr, str) or "/" not in cidr or not isinstance(description, str):
            return self._error(422, "unprocessable_entity", "cidr must be a valid CIDR.")
        now = self.clock.now()
        deleted = addon.deleted_cidrs.get(cidr)
        if deleted and (now - deleted).total_seconds() < self.settings.readd_window:
            return self._error(500, "server_error", "An unknown server error occurred.")
        if self.settings.duplicate_cidr == "reject" and any(r.cidr == cidr for r in addon.rules.values()):
            return self._error(422, "unprocessable_entity", "This CIDR is already allowed.")
        if len(addon.rules) >= self.settings.rule_limit:
            return self._error(
                422,
                "unprocessable_entity",
                f"A database can have at most {self.settings.rule_limit} IP rules.",
            )
        rule = SimRule(
            id=str(uuid.uuid4()),
            cidr=cidr,
            description=description,
            created_at=now,
            updated_at=now,
            authorized_at=now + timedelta(seconds=self.settings.authorize_after),
        )
        addon.rules[rule.id] = rule
        self.created.append(rule)
        return self._json(self._rule_json(rule), self.settings.create_status)

    def _op_ip_rule_get(self, request: Request, db: str, rule_id: str) -> Response:
        addon = self._mtls(db)
        if isinstance(addon, Response):
            return addon
        rule = addon.rules.get(rule_id)
        if rule is None:
            return self._error(404, "not_found", "Couldn't find that IP rule.")
        return self._json(self._rule_json(rule))

    def _op_ip_rule_delete(self, request: Request, db: str, rule_id: str) -> Response:
        addon = self._mtls(db)
        if isinstance(addon, Response):
            return addon
        rule = addon.rules.pop(rule_id, None)
        if rule is None:
            return self._error(404, "not_found", "Couldn't find that IP rule.")
        addon.deleted_cidrs[rule.cidr] = self.clock.now()
        self.deleted.append(rule.id)
        if self.settings.delete_answer == 204:
            return Response(status=204)
        return self._json(self._rule_json(rule))

    def _cert_json(self, cert: SimCertificate, *, with_keys: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": cert.id,
            "name": cert.name,
            "status": cert.status,
            "created_at": self._ts(cert.created_at),
            "updated_at": self._ts(cert.created_at),
            "expires_at": self._ts(cert.expires_at),
        }
        if with_keys:
            body["private_key"] = "-----BEGIN PRIVATE KEY-----\nSIMULATED\n-----END PRIVATE KEY-----\n"
            body["certificate_with_chain"] = (
                "-----BEGIN CERTIFICATE-----\nSIMULATED\n-----END CERTIFICATE-----\n"
            )
        return body

    def _op_certificates_list(self, request: Request, db: str) -> Response:
        addon = self._mtls(db)
        if isinstance(addon, Response):
            return addon
        return self._json([self._cert_json(c, with_keys=False) for c in addon.certificates.values()])

    def _op_certificate_get(self, request: Request, db: str, cert_id: str) -> Response:
        addon = self._mtls(db)
        if isinstance(addon, Response):
            return addon
        cert = addon.certificates.get(cert_id)
        if cert is None or cert.status == "disabled":
            return self._error(404, "not_found", "Couldn't find that certificate.")
        return self._json(self._cert_json(cert, with_keys=True))


class SimulatorTransport(httpx.WSGITransport):
    """In-process transport to the simulator that turns its timeout faults into real httpx timeouts,
    so the client's timeout handling runs without waiting on the wall clock."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if response.headers.get(FAULT_HEADER) in ("timeout", "ambiguous_timeout"):
            raise httpx.ReadTimeout("simulated timeout", request=request)
        return response
