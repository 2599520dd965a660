"""Delivery of the notification outbox to Slack's incoming webhook and to signed generic webhooks.

The worker runs it as its own job, apart from the sweep, so a slow or dead receiver can never delay the
closing of access. Rows are claimed with `FOR UPDATE SKIP LOCKED` and a lease, the claim is committed, the
HTTP calls run outside any transaction, and the result is committed afterwards. Each receiver that accepted
a row is recorded in `delivered_to`, so a retry never sends it there again. Delivery is at least once: a
receiver that accepts but answers too late (or a worker that dies before its commit) sees the event again,
with the same `id`, by which it drops the duplicate. A row that no receiver still missing accepts within a
day is given up, loudly: an ERROR log and a `notification:give_up` audit event. `delivered_at` marks a row
finished; a finished row whose `delivered_to` lacks a receiver was given up (`last_error` says why).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.clock import Clock
from app.config import Config
from app.models import AccessRequest, Notification
from app.services import audit
from app.services.grants import WORKER, Report, backoff
from app.slack import escape, human_duration, request_message

log = logging.getLogger(__name__)

SIGNATURE_VERSION = "v1"


@dataclass(frozen=True)
class DeliverySettings:
    timeout: float = 5.0
    """Seconds each HTTP call may take (connect, send, each read) before it counts as failed."""
    lease: float = 60.0
    """How long a claimed row is left alone by other workers; a claim is sized to finish well within it."""
    batch: int = 50
    max_backoff: float = 600.0
    give_up_after: float = 24 * 3600.0
    max_per_run: int = 1000


@dataclass(frozen=True)
class Receiver:
    name: str
    """Stable, and free of the URL's secrets: it is stored in `delivered_to` and written to logs."""
    url: str = ""
    slack: bool = False


def webhook_name(url: str) -> str:
    """`webhook:<host>:<hash of the URL>`: webhook URLs often carry a token, which must not reach the logs."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"webhook:{urlsplit(url).hostname}:{digest}"


def receivers_from(config: Config) -> tuple[Receiver, ...]:
    """The configured receivers: Slack's incoming webhook, then each generic webhook once."""
    found: list[Receiver] = []
    if config.slack_webhook_url:
        found.append(Receiver(name="slack", url=config.slack_webhook_url, slack=True))
    for url in config.webhook_urls:
        receiver = Receiver(name=webhook_name(url), url=url)
        if receiver not in found:
            found.append(receiver)
    return tuple(found)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`v1=` + hex HMAC-SHA256 of `{timestamp}.{body}` keyed by DRAWBRIDGE_WEBHOOK_SECRET."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


@dataclass(frozen=True)
class _Claim:
    id: uuid.UUID
    token: int
    """The row's `attempts` after this claim; a result is committed only while it still matches."""
    event: str
    payload: dict[str, Any]
    delivered_to: tuple[str, ...]


class Notifier:
    """Delivers the outbox to the receivers named in `config`; one instance per process."""

    def __init__(
        self,
        config: Config,
        *,
        sessions: sessionmaker[Session],
        clock: Clock,
        settings: DeliverySettings | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.settings = settings or DeliverySettings()
        self.receivers = receivers_from(config)
        self._secret = config.webhook_secret
        self._client = client or httpx.Client(
            timeout=self.settings.timeout, headers={"User-Agent": "drawbridge-notifier"}
        )
        if any(not r.slack for r in self.receivers) and not self._secret:
            log.warning(
                "DRAWBRIDGE_WEBHOOK_SECRET is not set: webhooks are sent unsigned, so receivers cannot tell "
                "Drawbridge's events from forged ones"
            )

    def close(self) -> None:
        self._client.close()

    def deliver(self, stop: Callable[[], bool] = lambda: False) -> Report:
        """Deliver every due row, a claim at a time, until none is left, `stop()` says so or the run's cap.

        Commits each claim, then each row's result; raises nothing for a failing receiver or row. A receiver
        that did not answer is not tried again in this run (its rows are retried later), so one dead receiver
        costs one timeout per run, not one per row."""
        report = Report()
        if not self.receivers:
            self._finish_without_receivers(report)
            return report
        per_claim = int(self.settings.lease / 2 // (len(self.receivers) * self.settings.timeout))
        per_claim = max(1, min(self.settings.batch, per_claim))
        unreachable: dict[str, str] = {}
        handled = 0
        while handled < self.settings.max_per_run and not stop():
            claims = self._claim(per_claim)
            if not claims:
                break
            for index, claim in enumerate(claims):
                if stop():
                    self._release(claims[index:])
                    return report
                try:
                    self._deliver_one(claim, unreachable, report)
                except Exception as exc:  # noqa: BLE001 - one bad row must not stop the others
                    self._push_back(claim, exc, report)
            handled += len(claims)
        return report

    # -- claiming -----------------------------------------------------------------------------------------

    def _claim(self, limit: int) -> list[_Claim]:
        now = self.clock.now()
        with self.sessions() as session:
            rows = session.scalars(
                select(Notification)
                .where(
                    Notification.delivered_at.is_(None),
                    or_(Notification.next_attempt_at.is_(None), Notification.next_attempt_at <= now),
                )
                .order_by(Notification.created_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            claims = []
            for row in rows:
                row.attempts += 1
                row.next_attempt_at = now + timedelta(seconds=self.settings.lease)
                claims.append(
                    _Claim(
                        id=row.id,
                        token=row.attempts,
                        event=row.event,
                        payload=dict(row.payload),
                        delivered_to=tuple(row.delivered_to or ()),
                    )
                )
            session.commit()
        return claims

    def _locked(self, session: Session, notification_id: uuid.UUID) -> Notification | None:
        return session.scalar(
            select(Notification)
            .where(Notification.id == notification_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )

    def _release(self, claims: Sequence[_Claim]) -> None:
        """Stopping: hand the claimed rows not tried yet back at once instead of leaving them to the lease."""
        with self.sessions() as session:
            for claim in claims:
                session.execute(
                    update(Notification)
                    .where(Notification.id == claim.id, Notification.attempts == claim.token)
                    .values(next_attempt_at=None)
                )
            session.commit()

    def _finish_without_receivers(self, report: Report) -> None:
        with self.sessions() as session:
            result = session.execute(
                update(Notification)
                .where(Notification.delivered_at.is_(None))
                .values(delivered_at=self.clock.now(), next_attempt_at=None)
            )
            session.commit()
        count: int = result.rowcount  # type: ignore[attr-defined]
        if count:
            log.info("%d notifications finished without delivery: no receiver is configured", count)
        report.add("no_receivers", count)

    # -- sending ------------------------------------------------------------------------------------------

    def _deliver_one(self, claim: _Claim, unreachable: dict[str, str], report: Report) -> None:
        accepted: list[str] = []
        errors: list[str] = []
        for receiver in self.receivers:
            if receiver.name in claim.delivered_to:
                continue
            if receiver.name in unreachable:
                errors.append(f"{receiver.name}: {unreachable[receiver.name]} (not tried again this run)")
                continue
            error = self._send(receiver, claim, unreachable)
            if error is None:
                accepted.append(receiver.name)
                report.add("sent")
            else:
                errors.append(f"{receiver.name}: {error}")
                report.add("send_failed")
        self._record(claim, accepted, errors, report)

    def _send(self, receiver: Receiver, claim: _Claim, unreachable: dict[str, str]) -> str | None:
        """POST one row to one receiver: None when it accepted (2xx), else why not."""
        if receiver.slack:
            body = json.dumps(slack_message(claim.payload)).encode()
            headers = {"Content-Type": "application/json"}
        else:
            body = json.dumps({"id": str(claim.id), **claim.payload}, separators=(",", ":")).encode()
            timestamp = str(int(self.clock.now().timestamp()))
            headers = {
                "Content-Type": "application/json",
                "X-Drawbridge-Event": claim.event,
                "X-Drawbridge-Delivery": str(claim.id),
                "X-Drawbridge-Timestamp": timestamp,
            }
            if self._secret:
                headers["X-Drawbridge-Signature"] = sign(self._secret, timestamp, body)
        try:
            with self._client.stream("POST", receiver.url, content=body, headers=headers) as response:
                if 200 <= response.status_code < 300:
                    return None
                return f"HTTP {response.status_code} {_snippet(response)}".strip()
        except httpx.TimeoutException:
            unreachable[receiver.name] = f"no answer within {self.settings.timeout:g}s"
        except httpx.HTTPError as exc:
            unreachable[receiver.name] = f"{type(exc).__name__}: {exc}"
        return unreachable[receiver.name]

    # -- recording ----------------------------------------------------------------------------------------

    def _record(self, claim: _Claim, accepted: list[str], errors: list[str], report: Report) -> None:
        """Commit what the receivers said. Acceptances are recorded even if the lease ran out meanwhile
        (they are facts, and spare the receiver a resend); only the claim's holder schedules a retry."""
        now = self.clock.now()
        with self.sessions() as session:
            row = self._locked(session, claim.id)
            if row is None:
                return
            delivered = list(row.delivered_to or [])
            delivered += [name for name in accepted if name not in delivered]
            row.delivered_to = delivered
            missing = [r.name for r in self.receivers if r.name not in delivered]
            if row.delivered_at is not None:
                pass
            elif not missing:
                row.delivered_at = now
                row.next_attempt_at = None
                row.last_error = None
                report.add("delivered")
            elif row.attempts != claim.token:
                log.warning("notification %s was claimed again while this attempt ran", row.id)
            else:
                error = "; ".join(errors) or "not delivered"
                deadline = row.created_at + timedelta(seconds=self.settings.give_up_after)
                if now >= deadline:
                    self._give_up(session, row, now, missing, error, report)
                else:
                    row.next_attempt_at = min(
                        now + backoff(row.attempts, self.settings.max_backoff), deadline
                    )
                    row.last_error = error
                    log.warning(
                        "notification %s (%s) not delivered to %s, attempt %d; retrying at %s: %s",
                        row.id,
                        row.event,
                        ", ".join(missing),
                        row.attempts,
                        row.next_attempt_at.isoformat(),
                        error,
                    )
            session.commit()

    def _give_up(
        self,
        session: Session,
        row: Notification,
        now: datetime,
        missing: list[str],
        error: str,
        report: Report,
    ) -> None:
        limit = timedelta(seconds=self.settings.give_up_after)
        row.delivered_at = now
        row.next_attempt_at = None
        row.last_error = f"gave up after {limit}: {error}"
        log.error(
            "gave up notification %s (%s) after %d attempts over %s; never delivered to %s: %s",
            row.id,
            row.event,
            row.attempts,
            limit,
            ", ".join(missing),
            error,
        )
        request = session.get(AccessRequest, row.request_id) if row.request_id is not None else None
        audit.record(
            session,
            principal=WORKER,
            action="notification:give_up",
            at=now,
            request=request,
            details={
                "notification_id": str(row.id),
                "event": row.event,
                "undelivered": missing,
                "delivered_to": list(row.delivered_to),
                "attempts": row.attempts,
                "error": error,
            },
        )
        report.add("given_up")

    def _push_back(self, claim: _Claim, error: BaseException, report: Report) -> None:
        """After an unexpected error on one row, push its next attempt back so it cannot loop."""
        log.exception("unexpected error delivering notification %s; it will be retried later", claim.id)
        report.add("row_errors")
        try:
            with self.sessions() as session:
                row = self._locked(session, claim.id)
                if row is None or row.attempts != claim.token or row.delivered_at is not None:
                    return
                row.next_attempt_at = self.clock.now() + backoff(row.attempts, self.settings.max_backoff)
                row.last_error = f"internal error: {type(error).__name__}"
                session.commit()
        except Exception:  # noqa: BLE001 - the database itself may be what failed; the lease runs out
            log.exception("could not record the error on notification %s", claim.id)


def _snippet(response: httpx.Response) -> str:
    """The start of an error response (Slack says why there, e.g. `invalid_payload`), never all of it."""
    try:
        for chunk in response.iter_bytes():
            return chunk[:200].decode("utf-8", "replace").strip()
    except httpx.HTTPError:
        pass
    return ""


# -- Slack messages -------------------------------------------------------------------------------------


def _esc(value: object) -> str:
    return escape(str(value))


def _human(seconds: object) -> str:
    return human_duration(int(seconds)) if isinstance(seconds, int | float) else "?"


def _when(value: object) -> str:
    if not isinstance(value, str):
        return "?"
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return value


def slack_message(payload: dict[str, Any]) -> dict[str, Any]:
    """The Slack incoming-webhook body for one notification: a readable line per event; a new request (or
    extension) waiting for approvers is `app.slack.request_message`, with Approve and Deny buttons."""
    event = payload.get("event")
    view: dict[str, Any] = payload.get("request") or {}
    request_id = str(view.get("id"))
    who = _esc(view.get("requester"))
    target = f"*{_esc(view.get('database'))}* from `{_esc(view.get('cidr'))}`"
    actor = _esc(payload.get("actor") or "Drawbridge")
    reason = payload.get("reason") or view.get("end_reason")
    because = f": {_esc(reason)}" if reason else ""
    if event in ("request_created", "extension_requested"):
        return request_message(view)
    if event in ("request_decided", "extension_decided"):
        decision = str(payload.get("decision") or view.get("status"))
        what = "extension of access to" if event == "extension_decided" else "request for"
        mark = ":no_entry:" if decision.startswith("denied") else ":white_check_mark:"
        text = f"{mark} {who}'s {what} {target} was {_esc(decision)} by {actor}{because}"
    elif event == "request_ended":
        text = f":wastebasket: {who}'s request for {target} ended before access was granted{because}"
    elif event == "access_ready":
        text = f":unlock: {who} can reach {target} now, until {_when(view.get('expires_at'))}"
    elif event == "access_ending":
        extend: dict[str, Any] = payload.get("extend") or {}
        text = (
            f":hourglass: {who}'s access to {target} ends at {_when(payload.get('ends_at'))} "
            f"(in {_human(payload.get('ends_in'))}). "
        )
        if extend.get("slack"):
            body = json.dumps(extend.get("body"))
            text += (
                f"To extend: `{_esc(extend['slack'])}` in Slack, or `{_esc(extend.get('api'))} {_esc(body)}`"
            )
        else:
            text += "It cannot be extended: the database's maximum duration is reached."
    elif event == "access_ended":
        status = str(view.get("status"))
        because = f": {_esc(reason)}" if reason and reason != status else ""
        text = f":lock: {who}'s access to {target} has ended ({_esc(status)}{because})"
    else:
        text = f"{_esc(event)}: request `{request_id}` is {_esc(view.get('status'))}"
    return {"text": text}
