"""Marshmallow schemas: they validate requests and, through flask-smorest, are the OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Any

import marshmallow as ma
from marshmallow import fields, validate
from sqlalchemy import Row

from app.models import AccessRequest, AuditEvent, Database, RequestStatus
from app.services import export
from app.validation import InvalidInput, check_printable, format_duration, parse_duration

MAX_PAGE = 200


class StrictSchema(ma.Schema):
    """Unknown fields are refused, so a typo never silently changes a security decision."""

    class Meta:
        unknown = ma.RAISE


def _check_text(value: str) -> None:
    try:
        check_printable(value, "the value")
    except InvalidInput as exc:
        raise ma.ValidationError(str(exc)) from None


class Text(fields.String):
    """A string without control characters."""

    def __init__(self, *, max_length: int = 1000, **kwargs: Any) -> None:
        validators: list[Callable[[Any], Any]] = [validate.Length(max=max_length), _check_text]
        super().__init__(validate=validators, **kwargs)


class Duration(fields.String):
    """An ISO 8601 duration (PT2H) or shorthand (90m, 2h, 1d); loaded as whole seconds. With `allow_zero`,
    `PT0S` (what it renders for zero) is accepted too."""

    def __init__(self, *, allow_zero: bool = False, **kwargs: Any) -> None:
        self.allow_zero = allow_zero
        metadata = kwargs.pop("metadata", {})
        metadata.setdefault("example", "PT2H")
        metadata.setdefault("description", "ISO 8601 duration such as PT2H, or shorthand such as 90m, 2h, 1d")
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > 40:
            raise ma.ValidationError("a duration is at most 40 characters")
        try:
            return int(parse_duration(text, allow_zero=self.allow_zero).total_seconds())
        except InvalidInput as exc:
            raise ma.ValidationError(str(exc)) from None

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else format_duration(int(value))


class UtcDateTime(fields.AwareDateTime):
    """An aware timestamp, loaded as UTC; one whose UTC time falls outside years 1-9999 is invalid."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise ma.ValidationError("the time is out of range") from None


def Timestamp(**kwargs: Any) -> fields.AwareDateTime:  # noqa: N802 - a field factory
    return UtcDateTime(default_timezone=UTC, **kwargs)


def WholeNumber(**kwargs: Any) -> fields.Integer:  # noqa: N802 - a field factory
    """An integer in a JSON body: a JSON integer only, never a fraction (2.5 is refused, not truncated) nor
    a string of digits, as the document's `type: integer` says."""
    return fields.Integer(strict=True, **kwargs)


# -- databases ---------------------------------------------------------------------------------------------


class ApproversSchema(StrictSchema):
    users = fields.List(fields.String(validate=validate.Length(1, 64)), validate=validate.Length(max=100))
    roles = fields.List(
        fields.String(validate=validate.OneOf(["requester", "approver", "auditor", "admin"])),
        validate=validate.Length(max=4),
    )

    @ma.validates_schema
    def _not_empty(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not (data.get("users") or data.get("roles")):
            raise ma.ValidationError("name at least one user or role (or send null to allow any approver)")


class AutoApproveRuleSchema(StrictSchema):
    users = fields.List(
        fields.String(validate=validate.Length(1, 64)),
        validate=validate.Length(min=1, max=100),
        metadata={"description": "Requests by these users match (any user when absent)"},
    )
    max_duration = Duration(metadata={"description": "Requests at most this long match (any when absent)"})


class PolicyFieldsMixin:
    default_duration = Duration(metadata={"description": "Duration granted when a request gives none"})
    max_duration = Duration(metadata={"description": "Longest duration one request may ask for"})
    approvals_required = WholeNumber(
        validate=validate.Range(1, 10), metadata={"description": "Distinct approvers needed"}
    )
    max_live_per_user = WholeNumber(
        validate=validate.Range(1, 100),
        metadata={"description": "Live requests one user may hold on this database"},
    )
    max_prefix = WholeNumber(
        validate=validate.Range(16, 32),
        metadata={"description": "Widest CIDR prefix a request may open (28 means /28)"},
    )
    approval_window = Duration(
        metadata={"description": "How long a request may wait for approval before timing out"}
    )
    reason_pattern = Text(
        max_length=200,
        allow_none=True,
        metadata={"description": "Regular expression the reason must contain, e.g. a ticket id"},
    )
    rule_headroom = WholeNumber(
        validate=validate.Range(0, 59),
        metadata={"description": "Heroku rule slots (of 60) kept free on this database"},
    )
    approvers = fields.Nested(
        ApproversSchema,
        allow_none=True,
        metadata={"description": "Who may approve: listed users and/or roles (null: anyone with approver)"},
    )
    auto_approve = fields.List(
        fields.Nested(AutoApproveRuleSchema),
        allow_none=True,
        validate=validate.Length(max=20),
        metadata={"description": "Requests matching any rule are approved by policy (null: none are)"},
    )
    self_extension = Duration(
        allow_none=True,
        allow_zero=True,
        metadata={"description": "Time a requester may add to live access without approval (null: none)"},
    )
    warn_before = Duration(
        allow_none=True,
        allow_zero=True,
        metadata={"description": "How long before access ends its holder is warned (null: not warned)"},
    )


class DatabaseCreateSchema(PolicyFieldsMixin, StrictSchema):
    name = fields.String(
        required=True,
        validate=validate.Regexp(r"^[a-z0-9][a-z0-9-]{0,62}$"),
        metadata={"description": "Name used in the API", "example": "main"},
    )
    app = fields.String(
        required=True,
        validate=validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"),
        metadata={"description": "Heroku app that owns the add-on", "example": "acme-api"},
    )
    addon = fields.String(
        required=True,
        validate=validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"),
        metadata={"description": "Heroku add-on name or id", "example": "postgresql-curved-12345"},
    )


class DatabasePolicySchema(PolicyFieldsMixin, StrictSchema):
    pass


class DatabaseSchema(ma.Schema):
    name = fields.String()
    app = fields.String()
    addon = fields.String()
    addon_id = fields.UUID()
    plan = fields.String()
    default_duration = Duration()
    max_duration = Duration()
    approvals_required = fields.Integer()
    max_live_per_user = fields.Integer()
    max_prefix = fields.Integer()
    approval_window = Duration()
    reason_pattern = fields.String(allow_none=True)
    rule_headroom = fields.Integer()
    approvers = fields.Nested(ApproversSchema, allow_none=True)
    auto_approve = fields.List(fields.Nested(AutoApproveRuleSchema), allow_none=True)
    self_extension = Duration()
    warn_before = Duration()
    created_at = Timestamp()
    updated_at = Timestamp()


class DatabaseListSchema(ma.Schema):
    items = fields.List(fields.Nested(DatabaseSchema))


def database_dict(db: Database) -> dict[str, Any]:
    return {key: getattr(db, key) for key in DatabaseSchema().fields}


# -- access requests ---------------------------------------------------------------------------------------


class AccessRequestCreateSchema(StrictSchema):
    database = fields.String(required=True, validate=validate.Length(1, 63))
    cidr = fields.String(
        required=True,
        validate=validate.Length(1, 43),
        metadata={
            "description": "IPv4 address or CIDR (a bare address is /32), or `auto` for the caller's own",
            "example": "8.8.8.8/32",
        },
    )
    duration = fields.String(
        validate=validate.Length(1, 40),
        metadata={
            "description": "ISO 8601 (PT2H) or shorthand (90m, 2h, 1d); default from policy",
            "example": "PT2H",
        },
    )
    reason = fields.String(required=True, validate=validate.Length(1, 1000))


class ApproveSchema(StrictSchema):
    comment = Text(allow_none=True)


class DenySchema(StrictSchema):
    reason = Text(required=True)


class EndSchema(StrictSchema):
    reason = Text(allow_none=True)


class ExtendSchema(StrictSchema):
    duration = fields.String(
        required=True,
        validate=validate.Length(1, 40),
        metadata={"description": "Time to add: ISO 8601 (PT1H) or shorthand (30m, 1h)", "example": "PT1H"},
    )


class ApprovalSchema(ma.Schema):
    approver = fields.String()
    round = fields.Integer(metadata={"description": "0 for the request, k for its k-th extension"})
    comment = fields.String(allow_none=True)
    approved_at = Timestamp()


class RuleSummarySchema(ma.Schema):
    id = fields.UUID(metadata={"description": "Drawbridge's id of the rule"})
    heroku_rule_id = fields.String(allow_none=True, metadata={"description": "Heroku's id, once created"})
    status = fields.String(metadata={"description": "creating, authorizing, authorized, deleting or deleted"})


class AccessRequestSchema(ma.Schema):
    id = fields.UUID()
    database = fields.String()
    cidr = fields.String()
    requester = fields.String(metadata={"description": "The user the access is for"})
    filed_by = fields.String(allow_none=True, metadata={"description": "The bot that filed it"})
    reason = fields.String()
    duration = Duration()
    status = fields.String(validate=validate.OneOf([s.value for s in RequestStatus]))
    approvals = fields.List(fields.Nested(ApprovalSchema))
    approvals_required = fields.Integer()
    created_at = Timestamp()
    decided_at = Timestamp(allow_none=True)
    activated_at = Timestamp(allow_none=True)
    expires_at = Timestamp(allow_none=True)
    ended_at = Timestamp(allow_none=True)
    end_reason = fields.String(allow_none=True)
    pending_extension = Duration(
        allow_none=True, metadata={"description": "Extra time asked for, waiting for approvers"}
    )
    ip_rule = fields.Nested(
        RuleSummarySchema,
        allow_none=True,
        metadata={
            "description": "The Heroku IP rule that carries this access (shared by overlapping requests)"
        },
    )
    status_detail = fields.String(
        allow_none=True,
        metadata={"description": "What the request is waiting for, or the last error the worker met"},
    )


class AccessRequestListSchema(ma.Schema):
    items = fields.List(fields.Nested(AccessRequestSchema))
    next_cursor = fields.String(allow_none=True)


class AccessRequestQuerySchema(StrictSchema):
    status = fields.String(validate=validate.OneOf([s.value for s in RequestStatus]))
    database = fields.String(validate=validate.Length(1, 63))
    requester = fields.String(validate=validate.Length(1, 64))
    cursor = fields.String(validate=validate.Length(1, 200))
    limit = fields.Integer(load_default=50, validate=validate.Range(1, MAX_PAGE))


def request_dict(request: AccessRequest) -> dict[str, Any]:
    return {
        "id": request.id,
        "database": request.database.name,
        "cidr": request.cidr,
        "requester": request.requester.name,
        "filed_by": request.filed_by.name if request.filed_by else None,
        "reason": request.reason,
        "duration": request.duration,
        "status": request.status.value,
        "approvals": [
            {"approver": a.approver.name, "round": a.round, "comment": a.comment, "approved_at": a.created_at}
            for a in request.approvals
        ],
        "approvals_required": request.database.approvals_required,
        "created_at": request.created_at,
        "decided_at": request.decided_at,
        "activated_at": request.activated_at,
        "expires_at": request.expires_at,
        "ended_at": request.ended_at,
        "end_reason": request.end_reason,
        "pending_extension": request.pending_extension,
        "ip_rule": (
            {
                "id": request.ip_rule.id,
                "heroku_rule_id": request.ip_rule.heroku_rule_id,
                "status": request.ip_rule.status.value,
            }
            if request.ip_rule is not None
            else None
        ),
        "status_detail": request.last_error or _waiting_for(request),
    }


def _waiting_for(request: AccessRequest) -> str | None:
    if request.status is RequestStatus.APPROVED:
        return "approved; Drawbridge is opening access at Heroku"
    if request.status is RequestStatus.PROVISIONING:
        return "Heroku is authorizing the IP rule; this usually takes a few minutes"
    return None


# -- reports ---------------------------------------------------------------------------------------------


class AccessReportQuerySchema(StrictSchema):
    database = fields.String(required=True, validate=validate.Length(1, 63))
    at = Timestamp(metadata={"description": "Who could reach the database at this moment"})
    start = Timestamp(
        data_key="from", metadata={"description": "With `to`: every grant overlapping [from, to)"}
    )
    end = Timestamp(data_key="to", metadata={"description": "End of the window (exclusive)"})

    @ma.validates_schema
    def _one_form(self, data: dict[str, Any], **kwargs: Any) -> None:
        window = [key for key in ("start", "end") if key in data]
        if ("at" in data) == bool(window):
            raise ma.ValidationError("give either `at`, or both `from` and `to`")
        if window and len(window) != 2:
            raise ma.ValidationError("give both `from` and `to`")
        if window and data["start"] >= data["end"]:
            raise ma.ValidationError("`from` must be before `to`", field_name="to")


class AccessGrantSchema(ma.Schema):
    cidr = fields.String()
    request_id = fields.UUID()
    requester = fields.String(metadata={"description": "The user the access was for"})
    filed_by = fields.String(allow_none=True, metadata={"description": "The bot that filed it"})
    reason = fields.String()
    approvers = fields.List(
        fields.String(), metadata={"description": "Who approved the request (empty when a policy did)"}
    )
    approved_by_policy = fields.Boolean(metadata={"description": "An auto-approval rule approved it"})
    extension_approvers = fields.List(
        fields.String(), metadata={"description": "Who approved its extensions, in order"}
    )
    granted_from = Timestamp(metadata={"description": "When access started (the rule was authorized)"})
    granted_until = Timestamp(
        allow_none=True, metadata={"description": "When access ended; null while the request is live"}
    )
    expires_at = Timestamp(allow_none=True, metadata={"description": "Scheduled end, after extensions"})
    status = fields.String(validate=validate.OneOf([s.value for s in RequestStatus]))
    rule_authorized_at = Timestamp(
        allow_none=True, metadata={"description": "When Heroku authorized the IP rule carrying it"}
    )
    rule_deleted_at = Timestamp(
        allow_none=True,
        metadata={"description": "When the rule was deleted at Heroku (later when other requests share it)"},
    )


class AccessReportSchema(ma.Schema):
    database = fields.String()
    at = Timestamp()
    start = Timestamp(data_key="from")
    end = Timestamp(data_key="to")
    grants = fields.List(fields.Nested(AccessGrantSchema))


GRANT_COLUMNS = tuple(AccessGrantSchema().fields)


# -- audit -------------------------------------------------------------------------------------------------


class AuditQuerySchema(StrictSchema):
    request_id = fields.UUID()
    actor = fields.String(validate=validate.Length(1, 64))
    on_behalf_of = fields.String(validate=validate.Length(1, 64))
    database = fields.String(validate=validate.Length(1, 63))
    action = fields.String(validate=validate.Length(1, 64))
    since = Timestamp(metadata={"description": "Events at or after this time"})
    until = Timestamp(metadata={"description": "Events before this time"})
    cursor = fields.String(validate=validate.Length(1, 200))
    limit = fields.Integer(load_default=100, validate=validate.Range(1, MAX_PAGE))


class AuditEventSchema(ma.Schema):
    id = fields.Integer()
    seq = fields.Integer(metadata={"description": "Position in the hash chain (commit order)"})
    occurred_at = Timestamp()
    actor = fields.String()
    on_behalf_of = fields.String(allow_none=True)
    source = fields.String()
    action = fields.String(metadata={"example": "access_request:approve"})
    request_id = fields.UUID(allow_none=True)
    database = fields.String(allow_none=True)
    details = fields.Dict()
    prev_hash = fields.String(metadata={"description": "The previous event's hash"})
    hash = fields.String(metadata={"description": "SHA-256 over the previous hash and this event's content"})


class AuditEventListSchema(ma.Schema):
    items = fields.List(fields.Nested(AuditEventSchema))
    next_cursor = fields.String(allow_none=True)


def audit_row(event: AuditEvent | Row[Any]) -> dict[str, Any]:
    return {key: getattr(event, key) for key in export.COLUMNS}


class ChainHeadSchema(ma.Schema):
    seq = fields.Integer()
    hash = fields.String()
    occurred_at = fields.String(metadata={"description": "ISO 8601 time of the event"})


class BrokenLinkSchema(ma.Schema):
    seq = fields.Integer()
    id = fields.Integer()
    problem = fields.String()


class VerificationSchema(ma.Schema):
    ok = fields.Boolean(metadata={"description": "True when every link of the chain holds"})
    count = fields.Integer(metadata={"description": "Events checked before the first broken link, or all"})
    head = fields.Nested(ChainHeadSchema, allow_none=True, metadata={"description": "Last event checked"})
    first_broken = fields.Nested(BrokenLinkSchema, allow_none=True)


class HealthSchema(ma.Schema):
    status = fields.String(metadata={"example": "ok"})
