"""Who is acting: the authenticated principal that every service receives, and the role checks on it."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.models import Role
from app.services.errors import PermissionDenied

HUMAN_ROLES = frozenset({Role.REQUESTER, Role.APPROVER, Role.AUDITOR, Role.ADMIN})


@dataclass(frozen=True)
class Principal:
    """The user on whose authority a call runs; `bot_name` is set when a bot filed it for them."""

    user_id: int
    name: str
    roles: frozenset[Role]
    token_id: str | None = None
    bot_id: int | None = None
    bot_name: str | None = None
    source: str = field(default="api")

    @property
    def actor(self) -> str:
        """The name recorded as the actor in the audit log: the bot when a bot acts."""
        return self.bot_name or self.name

    @property
    def on_behalf_of(self) -> str | None:
        return self.name if self.bot_name else None

    def has(self, *roles: Role) -> bool:
        return bool(self.roles.intersection(roles))

    def require(self, *roles: Role) -> None:
        """Raise PermissionDenied unless the principal holds one of `roles`."""
        if not self.has(*roles):
            wanted = " or ".join(sorted(r.value for r in roles))
            raise PermissionDenied(f"this needs the {wanted} role")

    def require_any_human_role(self) -> None:
        self.require(*HUMAN_ROLES)

    @property
    def sees_all_requests(self) -> bool:
        return self.has(Role.APPROVER, Role.AUDITOR, Role.ADMIN)


SYSTEM = Principal(user_id=0, name="drawbridge", roles=frozenset(), source="worker")
