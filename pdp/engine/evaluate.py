"""The decision rule and its reverse queries over one tenant's state.

Rule: an active user may do action A on resource (R, I) when some assignment, direct
or through an existing group the user is a member of, has not expired
(`expires_at is None or expires_at > now`), has scope `*`, `R:*` or `R:I`, and names
an existing role whose transitive permissions contain `R:A`, `R:*`, `*:A` or `*:*`.

Which grant is reported when several match (deterministic):
1. a direct assignment before any through a group;
2. then the narrowest scope (`R:I`, then `R:*`, then `*`);
3. then the smallest role id, then the smallest group id;
4. the permission reported is the most specific the role holds, in the order
   `R:A`, `R:*`, `*:A`, `*:*`; `path` is the shortest inheritance chain to a role
   holding it directly (children visited in sorted order).
`expired` is reported when nothing grants but an expired assignment would have.

Conditional grants (`pdp.conditions`) are looked at only when no unconditional grant
decides, and only in tenants that have any: the candidates (live assignments whose
scope covers the resource, naming a role that reaches a conditional grant of a wanted
permission) are evaluated in the order above until one's condition is true. When none
is, the reason is `condition_error` if one of them erred, else `condition_false`,
naming the first such grant.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Generator, Iterable, Iterator
from itertools import islice
from typing import cast

from pdp import conditions
from pdp.engine import holders
from pdp.engine.decision import (
    EXPIRED,
    NO_GRANT,
    UNKNOWN_TENANT,
    UNKNOWN_USER,
    USER_DISABLED,
    ActionsResult,
    Decision,
    Reason,
    ResourcesResult,
)
from pdp.engine.grants import Grant, Grants, candidates, iter_grants, scope_rank
from pdp.engine.tenant import TenantState, UserRec

ACTIVE = "active"
# Inventory resources a resource search examines at most (a condition costs ~10 us each).
INVENTORY_LIMIT = 10_000
# Condition evaluations between two pauses of a search: ~10 us each, so a piece of 50 is
# ~0.5 ms of the event loop (200 were 2-2.7 ms, measured at 5,000 candidates).
CONDITION_PIECE = 50
# subjects(): scan all users once the candidates reach len(users) / _SCAN_SHARE. Per
# user a scan costs under half of a candidate's (set building, lookup, and sorting
# ids that come out of a set in no order): scanning is then no slower.
_SCAN_SHARE = 3
_Hit = tuple[Grant, frozenset[str]]
_Scopes = tuple[str, str, str]
_Wanted = tuple[str, str, str, str]


def _asked(rtype: str, rid: str, action: str) -> tuple[_Scopes, _Wanted]:
    """The scopes an assignment may have and the permissions a role may hold to match."""
    whole_type = rtype + ":*"
    return (f"{rtype}:{rid}", whole_type, "*"), (
        f"{rtype}:{action}",
        whole_type,
        "*:" + action,
        "*:*",
    )


def _first(
    grants: Grants,
    scopes: _Scopes,
    wanted: _Wanted,
    closure: dict[str, frozenset[str]],
    now: float,
) -> _Hit | bool:
    """The first unexpired matching grant in order, else whether an expired one matched."""
    scan = candidates(grants, scopes[0], scopes[1]) if isinstance(grants, dict) else grants
    expired = False
    for grant in scan:
        if grant[1] in scopes:
            perms = closure.get(grant[0])
            if perms is not None and not perms.isdisjoint(wanted):
                expires = grant[2]
                if expires is None or expires > now:
                    return grant, perms
                expired = True
    return expired


def check(  # noqa: PLR0917 -- mirrors Engine.check
    state: TenantState,
    user: str,
    rtype: str,
    rid: str,
    action: str,
    now: float,
    facts: FactsSource = None,
) -> Decision:
    """Decide one request against an existing tenant's state; never raises on unknown ids.

    `facts` may be a callable that builds them: called only if a conditional grant is a
    candidate.
    """
    rec = state.users.get(user)
    if rec is None or rec[0] is None:
        return UNKNOWN_USER
    if rec[0] != ACTIVE:
        return USER_DISABLED
    whole_type = rtype + ":*"
    scopes = (f"{rtype}:{rid}", whole_type, "*")
    wanted = (f"{rtype}:{action}", whole_type, "*:" + action, "*:*")
    hit = _first(rec[1], scopes, wanted, state.roles.closure, now)
    if isinstance(hit, tuple):
        return _decision(state, hit, None, wanted)
    if rec[2]:
        denied = _via_groups(state, rec[2], scopes, wanted, now, hit)
        if denied.allowed:
            return denied
    else:
        denied = EXPIRED if hit else NO_GRANT
    if state.roles.cond_closure:
        what = (rtype, rid, action)
        return _conditional(state, (user, rec), what, scopes, wanted, now, facts) or denied
    return denied


FactsSource = conditions.Facts | Callable[[], conditions.Facts | None] | None


# What a user's requests share in a BatchCheck: the tenant's state (None: no such
# tenant), the scopes the user's grants name (a frozenset of the tuple holders' scopes,
# then each ScopeIndex holder itself), and the decisions memoized by (type, action).
_Shared = tuple[TenantState | None, tuple[Container[str], ...], dict[tuple[str, str], Decision]]


class BatchCheck:
    """`check` for many requests at one `now` over a state that does not change
    meanwhile (one synchronous stretch: a batch), sharing the work of one user's requests.

    A request whose resource scope (`type:id`) no grant of the user (direct or through a
    group) names can only be decided by grants of scope `type:*` or `*`: its decision
    is the same for every such id, so it is computed once per (type, action) and reused.
    Not reused: a decision a condition took part in (a condition reads the resource's id
    and attributes; every decision with a conditional candidate names its condition).
    Every other request is decided by `check` itself, so each answer is exactly `check`'s.
    """

    __slots__ = ("_last", "_live", "_now", "_users")

    def __init__(self, live: Callable[[str], TenantState | None], now: float) -> None:
        self._live = live  # an existing tenant's state, else None (Engine._live)
        self._now = now
        self._users: dict[tuple[str, str], _Shared] = {}
        # The last (tenant, user) and what they share: a batch's entries mostly name the
        # same two string objects (its default subject), so most entries skip the lookup.
        self._last: tuple[str | None, str | None, _Shared] = (None, None, (None, (), {}))

    def check(  # noqa: PLR0917 -- mirrors Engine.check
        self, tenant: str, user: str, rtype: str, rid: str, action: str,
        facts: FactsSource = None,
    ) -> Decision:  # fmt: skip
        last_tenant, last_user, shared = self._last
        if user is not last_user or tenant is not last_tenant:
            found = self._users.get((tenant, user))
            if found is None:
                found = self._users[tenant, user] = self._share(tenant, user)
            self._last, shared = (tenant, user, found), found
        state, named, memo = shared
        if state is None:
            return UNKNOWN_TENANT
        one = f"{rtype}:{rid}"
        for scopes in named:
            if one in scopes:  # a grant names this resource: decided on its own
                return check(state, user, rtype, rid, action, self._now, facts)
        key = (rtype, action)
        decision = memo.get(key)
        if decision is None:
            decision = check(state, user, rtype, rid, action, self._now, facts)
            if decision.condition is None:  # no conditional grant was a candidate
                memo[key] = decision
        return decision

    def _share(self, tenant: str, user: str) -> _Shared:
        state = self._live(tenant)
        if state is None:
            return None, (), {}
        rec = state.users.get(user)
        if rec is None:
            return state, (), {}
        small: set[str] = set()
        indexed: list[Container[str]] = []
        for grants in _holders(state, rec):
            if isinstance(grants, dict):
                indexed.append(grants)
            else:
                small.update(grant[1] for grant in grants)
        return state, (frozenset(small), *indexed) if small else tuple(indexed), {}


_Rank = tuple[bool, int, str, str, int]
_Candidate = tuple[_Rank, Grant, str | None, str, str, conditions.Condition]


def _candidates(
    state: TenantState, rec: UserRec, scopes: _Scopes, wanted: _Wanted, now: float
) -> list[_Candidate]:
    """The conditional grants that could allow, in the order a grant is reported."""
    conds = state.roles.cond_closure
    live = state.live_groups
    found: list[_Candidate] = []
    holders_ = ((None, rec[1]), *((gid, live[gid]) for gid in rec[2] if gid in live))
    for group, grants in holders_:
        scan = candidates(grants, scopes[0], scopes[1]) if isinstance(grants, dict) else grants
        for grant in scan:
            if grant[1] not in scopes or not (grant[2] is None or grant[2] > now):
                continue
            for holder, perm, cond in conds.get(grant[0], ()):
                if perm in wanted:
                    rank = (group is not None, scope_rank(grant[1]), grant[0], group or "")
                    found.append(((*rank, wanted.index(perm)), grant, group, holder, perm, cond))
    found.sort(key=lambda c: c[0])
    return found


def _conditional(  # noqa: PLR0917 -- internal, positional on purpose
    state: TenantState,
    who: tuple[str, UserRec],
    what: tuple[str, str, str],
    scopes: _Scopes,
    wanted: _Wanted,
    now: float,
    facts: FactsSource,
) -> Decision | None:
    """The first conditional grant whose condition is true; a denial naming why none is;
    None when there is no candidate."""
    found = _candidates(state, who[1], scopes, wanted, now)
    if not found:
        return None
    rtype, rid, action = what
    if callable(facts):
        facts = facts()
    uses = found[0][5].uses
    for cand in found[1:]:
        uses |= cand[5].uses
    values = conditions.activation(
        facts,
        who[0],
        state.user_attributes.get(who[0]),
        rtype,
        rid,
        state.resource_attributes(rtype, rid),
        action,
        now,
        uses,
    )
    failed: tuple[_Candidate, conditions.Outcome, str | None] | None = None
    for cand in found:
        _, (role, scope, expires), group, holder, perm, cond = cand
        outcome, error = conditions.evaluate(cond, values)
        if outcome == conditions.TRUE:
            path = state.roles.path_to(role, holder)
            return Decision(True, "granted", role, path, perm, group, scope, expires, cond.text)
        if failed is None or (outcome == conditions.ERROR and failed[1] != conditions.ERROR):
            failed = (cand, outcome, error)
    assert failed is not None
    (_, (role, scope, expires), group, holder, perm, cond), outcome, error = failed
    reason: Reason = "condition_error" if outcome == conditions.ERROR else "condition_false"
    path = state.roles.path_to(role, holder)
    return Decision(False, reason, role, path, perm, group, scope, expires, cond.text, error)


def _via_groups(  # noqa: PLR0917 -- internal hot path, positional on purpose
    state: TenantState,
    groups: tuple[str, ...],
    scopes: _Scopes,
    wanted: _Wanted,
    now: float,
    expired: bool,
) -> Decision:
    """Best grant through the user's groups: narrowest scope, then role, then group id."""
    live = state.live_groups
    closure = state.roles.closure
    best: tuple[int, str, str, _Hit] | None = None
    for gid in groups:
        grants = live.get(gid)
        if grants is None:
            continue
        found = _first(grants, scopes, wanted, closure, now)
        if isinstance(found, tuple):
            key = (scope_rank(found[0][1]), found[0][0])
            if best is None or key < best[:2]:
                best = (*key, gid, found)
        elif found:
            expired = True
    if best is not None:
        return _decision(state, best[3], best[2], wanted)
    return EXPIRED if expired else NO_GRANT


def _decision(state: TenantState, hit: _Hit, group: str | None, wanted: _Wanted) -> Decision:
    (role, scope, expires), perms = hit
    for perm in wanted:
        if perm in perms:
            break
    return state.granted(role, perm, group, scope, expires)


def _holders(state: TenantState, rec: UserRec) -> tuple[Grants, ...]:
    """A user's grant holders: her own grants, then each existing group's she is in."""
    live = state.live_groups
    return (rec[1], *(live[gid] for gid in rec[2] if gid in live))


def _live_grants(
    state: TenantState, rec: UserRec, now: float, scopes: _Scopes | None = None
) -> Iterator[Grant]:
    """Every unexpired grant a user holds, directly or through existing groups.

    With `scopes`, a holder's scope index yields only the grants that may match them
    (others may still come: the caller filters), so a holder of thousands of
    resource-scoped grants costs three lookups.
    """
    for grants in _holders(state, rec):
        if scopes is not None and isinstance(grants, dict):
            scan: Iterable[Grant] = candidates(grants, scopes[0], scopes[1])
        else:
            scan = iter_grants(grants)
        for grant in scan:
            if grant[2] is None or grant[2] > now:
                yield grant


def _active(state: TenantState, user: str) -> UserRec | None:
    rec = state.users.get(user)
    return rec if rec is not None and rec[0] == ACTIVE else None


def actions(  # noqa: PLR0917 -- mirrors Engine.actions
    state: TenantState,
    user: str,
    rtype: str,
    rid: str,
    now: float,
    facts: FactsSource = None,
) -> ActionsResult:
    """Actions the user may do on (rtype, rid): exactly those `check` allows.

    Named actions come from `R:A` and `*:A` grants; `R:*` / `*:*` set `all_actions`.
    """
    rec = _active(state, user)
    if rec is None:
        return ActionsResult((), False)
    scopes, _ = _asked(rtype, rid, "*")
    prefix = rtype + ":"
    named: set[str] = set()
    every = False
    for role, scope, _expires in _live_grants(state, rec, now, scopes):
        perms = state.roles.closure.get(role)
        if perms is None or scope not in scopes:
            continue
        for perm in perms:
            if perm in (scopes[1], "*:*"):
                every = True
            elif perm.startswith(prefix):
                named.add(perm[len(prefix) :])
            elif perm.startswith("*:"):
                named.add(perm[2:])
    undecided: set[str] = set()
    if state.roles.cond_closure:
        facts = facts() if callable(facts) else facts
        _conditional_actions(state, (user, rec), (rtype, rid), now, facts, (named, undecided))
        if undecided and not every:
            # A conditional `type:*` grant whose condition reads nothing of the action.
            probe = check(state, user, rtype, rid, "\x00", now, facts)
            reads = (
                ()
                if probe.condition is None
                else conditions.compile_condition(probe.condition).uses
            )
            if probe.condition is not None and "action" not in reads:
                every = probe.allowed  # decided for every action alike
                if probe.reason != "condition_error":
                    undecided.discard(probe.condition)
    return ActionsResult(tuple(sorted(named)), every, tuple(sorted(undecided)))


def _conditional_actions(  # noqa: PLR0917 -- internal
    state: TenantState,
    who: tuple[str, UserRec],
    what: tuple[str, str],
    now: float,
    facts: FactsSource,
    out: tuple[set[str], set[str]],
) -> None:
    """Add the actions conditional grants allow (as `check` decides each) to out[0], and
    the conditions that cannot be decided to out[1]."""
    user, rec = who
    rtype, rid = what
    named, undecided = out
    scopes, _ = _asked(rtype, rid, "*")
    prefix = rtype + ":"
    conds = state.roles.cond_closure
    for role, scope, _expires in _live_grants(state, rec, now, scopes):
        if scope not in scopes:
            continue
        for _holder, perm, cond in conds.get(role, ()):
            if not perm.startswith((prefix, "*:")):
                continue
            name = perm.split(":", 1)[1]
            if name == "*":
                undecided.add(cond.text)  # which actions it allows depends on action.name
            elif name not in named:
                decision = check(state, user, rtype, rid, name, now, facts)
                if decision.allowed:
                    named.add(name)
                elif decision.reason == "condition_error" and decision.condition:
                    undecided.add(decision.condition)


def resources(  # noqa: PLR0917 -- mirrors Engine.resources
    state: TenantState,
    user: str,
    rtype: str,
    action: str,
    now: float,
    facts: FactsSource = None,
    limit: int = INVENTORY_LIMIT,
) -> ResourcesResult:
    """Ids of type `rtype` the user may do `action` on: exactly those `check` allows.

    Ids come from `rtype:id` scoped assignments; a `*` or `rtype:*` scoped one that
    grants the action sets `all_resources` and lists the inventory's resources of the
    type. Conditional grants are decided per resource as `check` decides them; at most
    `limit` inventory resources are examined (`truncated` says when there were more).
    """
    steps = resource_steps(state, user, rtype, action, now, facts, limit)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(ResourcesResult, done.value)


def resource_steps(  # noqa: PLR0912, PLR0917 -- mirrors Engine.resources, one pass
    state: TenantState,
    user: str,
    rtype: str,
    action: str,
    now: float,
    facts: FactsSource = None,
    limit: int = INVENTORY_LIMIT,
    *,
    size: int = CONDITION_PIECE,
) -> Generator[None, None, ResourcesResult]:
    """`resources` as a generator that pauses after every `size` inventory resources
    decided by a condition (its return value is the result), so a caller can give other
    work a turn. It reads the tenant's live dicts: do not resume it after a change."""
    rec = _active(state, user)
    if rec is None:
        return ResourcesResult((), False)
    scopes, wanted = _asked(rtype, "*", action)
    prefix = rtype + ":"
    ids: set[str] = set()
    every = False
    for role, scope, _expires in _live_grants(state, rec, now):
        perms = state.roles.closure.get(role)
        if perms is None or perms.isdisjoint(wanted):
            continue
        if scope in scopes:
            every = True
        elif scope.startswith(prefix):
            ids.add(scope[len(prefix) :])
    inventory = state.resources.get(rtype, {})
    truncated = len(inventory) > limit
    listed = list(islice(inventory, limit))
    if every:
        ids.update(listed)
    undecided: set[str] = set()
    if state.roles.cond_closure:
        facts = facts() if callable(facts) else facts
        wildcard = _conditional_resources(
            state, (user, rec), (rtype, action), now, facts, ids, undecided
        )
        if (
            wildcard
            and not every
            and _covers_every_resource(state, user, rtype, action, now, facts)
        ):
            every = True
            ids.update(listed)
        if wildcard and not every:
            for done, rid in enumerate(listed, start=1):
                if rid not in ids:
                    _decide_one(state, user, (rtype, rid, action), now, facts, ids, undecided)
                if done % size == 0:
                    yield
            if not inventory:
                undecided.update(wildcard)
            else:
                undecided.update(
                    _unlisted_may_pass(state, user, (rtype, action), now, facts, wildcard)
                )
    return ResourcesResult(tuple(sorted(ids)), every, tuple(sorted(undecided)), truncated)


def _decide_one(  # noqa: PLR0917 -- internal
    state: TenantState,
    user: str,
    what: tuple[str, str, str],
    now: float,
    facts: FactsSource,
    ids: set[str],
    undecided: set[str],
) -> None:
    decision = check(state, user, *what, now, facts)
    if decision.allowed:
        ids.add(what[1])
    elif decision.reason == "condition_error" and decision.condition:
        undecided.add(decision.condition)


def _unlisted_may_pass(  # noqa: PLR0917 -- internal
    state: TenantState,
    user: str,
    what: tuple[str, str],
    now: float,
    facts: FactsSource,
    wildcard: set[str],
) -> set[str]:
    """The wildcard-scoped conditions that may allow a resource outside the inventory:
    a search lists the inventory, `check` decides any id. Every unlisted resource looks
    alike to a condition (no attributes, the request's properties) but for its id, so
    one probe decides them all for conditions that do not read `resource.id`; those
    that do (or read `resource` whole) stay undecided."""
    rtype, action = what
    out = {text for text in wildcard if _reads_resource_id(text)}
    probe = check(state, user, rtype, "\x00", action, now, facts)  # no `type:id` scope is NUL
    if probe.allowed and probe.condition is not None:
        out.add(probe.condition)
    return out


_RESOURCE = re.compile(r"\bresource\b(?!\s*\.\s*(?:attributes|properties|type)\b)")


def _reads_resource_id(text: str) -> bool:
    """Whether a condition may read the resource's id: conservatively, any `resource`
    not followed by `.attributes`, `.properties` or `.type` counts (a word in a string
    literal too: a false yes only marks the answer as maybe incomplete)."""
    return _RESOURCE.search(text) is not None


def _covers_every_resource(  # noqa: PLR0917 -- internal
    state: TenantState, user: str, rtype: str, action: str, now: float, facts: FactsSource
) -> bool:
    """Whether a wildcard-scoped conditional grant whose condition reads nothing of the
    resource (a time window, say) holds: it then allows every resource of the type."""
    probe = check(state, user, rtype, "\x00", action, now, facts)  # no `type:id` scope is NUL
    if not probe.allowed or probe.condition is None:
        return False
    return "resource" not in conditions.compile_condition(probe.condition).uses


def _conditional_resources(  # noqa: PLR0917 -- internal
    state: TenantState,
    who: tuple[str, UserRec],
    what: tuple[str, str],
    now: float,
    facts: FactsSource,
    ids: set[str],
    undecided: set[str],
) -> set[str]:
    """Decide the resources named by scoped conditional grants into `ids`; return the
    conditions of wildcard-scoped ones (their resources come from the inventory)."""
    user, rec = who
    rtype, action = what
    scopes, wanted = _asked(rtype, "*", action)
    prefix = rtype + ":"
    conds = state.roles.cond_closure
    wildcard: set[str] = set()
    for role, scope, _expires in _live_grants(state, rec, now):
        texts = [c.text for _, perm, c in conds.get(role, ()) if perm in wanted]
        if not texts:
            continue
        if scope in scopes:
            wildcard.update(texts)
        elif scope.startswith(prefix) and scope[len(prefix) :] not in ids:
            _decide_one(
                state, user, (rtype, scope[len(prefix) :], action), now, facts, ids, undecided
            )
    return wildcard


def subjects(state: TenantState, rtype: str, rid: str, action: str, now: float) -> tuple[str, ...]:
    """Active users who may do `action` on (rtype, rid): exactly those `check` allows.

    Cost follows the answer, not the tenant: a pass over the role closures finds the
    roles holding a wanted permission; the reverse indexes give who holds them at the
    scopes covering the resource and the members of such groups. Each candidate is
    then decided as `check` decides it (status, expiry, existing group). When the
    candidates are a third of the users or more, the users are scanned instead.
    """
    out = [uid for chunk in subject_chunks(state, rtype, rid, action, now) for uid in chunk]
    out.sort()
    return tuple(out)


def conditional_subjects(  # noqa: PLR0917 -- mirrors Engine.subjects
    state: TenantState,
    rtype: str,
    rid: str,
    action: str,
    now: float,
    facts: FactsSource = None,
) -> tuple[list[str], tuple[str, ...]]:
    """Users only a conditional grant allows (as `check` decides each; unsorted), and the
    conditions that could not be decided with what the request gave.

    The candidates are the holders of roles reaching a conditional grant of a wanted
    permission, at the scopes covering the resource: cost follows them, not the tenant.
    """
    out: list[str] = []
    undecided: set[str] = set()
    for allowed, unsure in conditional_subject_chunks(state, rtype, rid, action, now, facts):
        out.extend(allowed)
        undecided.update(unsure)
    return out, tuple(sorted(undecided))


def conditional_subject_chunks(  # noqa: PLR0917 -- mirrors Engine.subjects
    state: TenantState,
    rtype: str,
    rid: str,
    action: str,
    now: float,
    facts: FactsSource = None,
    *,
    size: int = CONDITION_PIECE,
) -> Iterator[tuple[list[str], set[str]]]:
    """`conditional_subjects` in pieces of at most `size` candidates decided each.

    A candidate costs a condition evaluation (tens of us): a caller gives other work a
    turn between pieces. Like `subject_chunks`, it reads the tenant's live dicts and
    must not be resumed after any change to the engine.
    """
    conds = state.roles.cond_closure
    if not conds:
        return
    scopes, wanted = _asked(rtype, rid, action)
    roles = [role for role, held in conds.items() if any(perm in wanted for _, perm, _ in held)]
    if not roles:
        return
    distinct = tuple(dict.fromkeys(scopes))
    groups = holders.union(holders.pools(state.group_holders, roles, distinct))
    found = holders.pools(state.user_holders, roles, distinct)
    found += [state.members[gid] for gid in groups if gid in state.members]
    if callable(facts):
        facts = facts()
    candidates = iter(holders.union(found))
    while piece := list(islice(candidates, size)):
        out: list[str] = []
        undecided: set[str] = set()
        for uid in piece:
            decision = check(state, uid, rtype, rid, action, now, facts)
            if decision.allowed and decision.condition is not None:
                out.append(uid)
            elif decision.reason == "condition_error" and decision.condition:
                undecided.add(decision.condition)
        yield out, undecided


def subject_chunks(
    state: TenantState, rtype: str, rid: str, action: str, now: float, *, size: int = 1000
) -> Iterator[list[str]]:
    """`subjects` in unsorted pieces of at most `size` candidates examined each.

    Lets a caller give other work a turn between pieces. The generator reads the
    tenant's live dicts: it must not be resumed after any change to the engine.
    """
    scopes, wanted = _asked(rtype, rid, action)
    closure = state.roles.closure
    roles = [role for role, perms in closure.items() if not perms.isdisjoint(wanted)]
    if not roles:
        return

    def grants_it(grants: Grants) -> bool:
        return isinstance(_first(grants, scopes, wanted, closure, now), tuple)

    distinct = tuple(dict.fromkeys(scopes))
    live = state.live_groups
    groups = {
        gid
        for gid in holders.union(holders.pools(state.group_holders, roles, distinct))
        if gid in live and grants_it(live[gid])
    }
    yield []  # a turn for the caller: the groups may have taken a while
    found = holders.pools(state.user_holders, roles, distinct)
    found += [state.members[gid] for gid in groups if gid in state.members]
    users = state.users
    chosen: Iterable[tuple[str, UserRec]]
    if holders.size(found) * _SCAN_SHARE >= len(users):
        chosen = users.items()  # a scan is cheaper per user, and its order sorts faster
    else:
        # Deduplicated as the pieces are drawn, not in one set built up front (tens of
        # thousands of ids would be one long step between the caller's turns).
        candidates = holders.distinct(found)
        chosen = ((uid, users[uid]) for uid in candidates)
    iterator = iter(chosen)
    while piece := list(islice(iterator, size)):
        yield [
            uid
            for uid, (status, grants, member_of) in piece
            if status == ACTIVE and (not groups.isdisjoint(member_of) or grants_it(grants))
        ]
