"""Values the engine answers with: decisions and reverse-query results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reason = Literal[
    "granted",
    "unknown_tenant",
    "unknown_user",
    "user_disabled",
    "no_grant",
    "expired",
    "condition_false",
    "condition_error",
]


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer and why.

    For a grant: `role` is the assigned role, `path` runs from it down the inheritance
    chain to the role that holds `permission` directly (`(role,)` when it holds it itself),
    `via_group` names the group the assignment came through (None when direct), and
    `scope` / `expires_at` are the assignment's. `condition` is the CEL expression of a
    conditional grant. Denials carry only `reason`, except `condition_false` and
    `condition_error`, which name the conditional grant that did not apply (and the error).
    """

    allowed: bool
    reason: Reason
    role: str | None = None
    path: tuple[str, ...] = ()
    permission: str | None = None
    via_group: str | None = None
    scope: str | None = None
    expires_at: float | None = None
    condition: str | None = None
    error: str | None = None

    def to_context(self) -> dict[str, object]:
        """A JSON-ready dict of the reason fields; None and empty fields are left out."""
        out: dict[str, object] = {"reason": self.reason}
        if self.role is not None:
            out["role"] = self.role
        if self.path:
            out["path"] = list(self.path)
        for name in ("permission", "via_group", "scope", "expires_at", "condition"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.error is not None:
            out["detail"] = self.error  # `error` in a context is a bad request's object
        return out


UNKNOWN_TENANT = Decision(allowed=False, reason="unknown_tenant")
UNKNOWN_USER = Decision(allowed=False, reason="unknown_user")
USER_DISABLED = Decision(allowed=False, reason="user_disabled")
NO_GRANT = Decision(allowed=False, reason="no_grant")
EXPIRED = Decision(allowed=False, reason="expired")


@dataclass(frozen=True, slots=True)
class ActionsResult:
    """Actions granted on one resource, sorted.

    `all_actions` is True when a grant with action `*` applies; `actions` then still
    lists only the explicitly named actions.
    """

    actions: tuple[str, ...]
    all_actions: bool
    # Conditions that could not be decided with what the request gave (an error, or a
    # conditional `type:*` / `*:*` grant whose actions cannot be listed): the answer may
    # be incomplete for them.
    undecided: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResourcesResult:
    """Resource ids of one type a user may act on, sorted.

    `ids` come from assignments scoped to one resource and, where a `*` or `type:*`
    scoped grant applies, from the resource inventory (conditions evaluated per
    resource); `all_resources` is True when such a grant is unconditional: it then
    covers every resource of the type, listed in the inventory or not.
    """

    ids: tuple[str, ...]
    all_resources: bool
    # Conditions that could not be decided with what the request gave (an error, or a
    # conditional wildcard-scoped grant with no inventory of the type to list).
    undecided: tuple[str, ...] = ()
    # The inventory of the type was larger than a search examines (see `resources`).
    truncated: bool = False
