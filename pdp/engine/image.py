"""The engine's state as a stream of pickled pieces, read back without rebuilding it.

Rebuilding a 1,000,000-user engine from its rows costs what the first load cost (every
row upserted again, ~15 s of CPU); reading this image back costs ~2.7 s: the state's
own dicts, tuples and strings are recreated as they were held. `dump` writes the
pieces with one `pickle.Pickler` and `load` reads them with one `Unpickler`, so the
memo spans pieces: an object held in several places (a user id in `users`, `members`
and `user_holders`; a grant tuple most users share) is written once and comes back
as one object, as held.

Why pickle and why it is safe here: the C pickler is the fastest way CPython has to
write and recreate plain containers, and it keeps shared objects shared (marshal
re-interns every string and was slower). The state holds only dicts, sets, tuples,
str, int, float, bool and None, which pickle writes without naming any class, and
the reader refuses every class a stream names (`_Plain.find_class`), so a damaged or
forged file can fail to load but cannot run code. The role graph (conditions are
compiled objects) is written as its rows and rebuilt through the upserts.

Writing is two steps. `capture` copies the state's containers (dicts and sets, and a
user record holding a scope index), sharing everything immutable (ids, grant tuples,
group tuples, attribute texts): ~0.6 s at 1,000,000 users, the only part during which
the caller must apply no change. `dump` then pickles the copy, which nothing else
touches, while changes go on being applied to the engine.

Pieces are bounded (about PIECE objects each, a large nested dict split further), so
neither side holds the GIL for long: a worker thread dumping or loading leaves the
event loop turning between pieces.

What is not kept: the per-tenant decision cache (refilled by checks) and interning (the
ids come back shared with each other, not with `sys.intern`: a later change to a user
interns its id again, costing one more copy of that id string).

LAYOUT names what `TenantState` holds and how. Change either and bump it: a file with
another layout is refused (the caller then loads from the database), never misread.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import IO, Any, NoReturn, Protocol

from pdp.engine.engine import Engine
from pdp.engine.export import TableRows, empty_tables, role_rows
from pdp.engine.snapshot import Snapshot
from pdp.engine.tenant import TenantState

LAYOUT = 1
PIECE = 10_000  # objects per piece, about: ~10-20 ms to load or dump one
_PROTOCOL = 5
_ROLE_ENTITIES = ("roles", "role_inherits", "role_permissions")
# The TenantState fields written as they are held (everything but the tenant's own
# flags, counts and digest, its role graph and its decision cache).
FIELDS = (
    "users",
    "user_attributes",
    "user_holders",
    "members",
    "groups",
    "group_grants",
    "live_groups",
    "group_holders",
    "resources",
)

Path = tuple[str, ...]


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


class BadImage(ValueError):
    """The stream is not an engine image this code reads."""


@dataclass(frozen=True, slots=True)
class Held:
    """One tenant's state as `capture` copied it."""

    tenant_id: str
    exists: bool
    count: dict[str, int]
    total: int  # the running digest's sum
    roles: list[tuple[str, list[Any]]]  # (entity, rows) of the role graph
    fields: dict[str, Any]  # FIELDS -> copies


def capture(engine: Engine, *, copy: bool = True) -> list[Held]:
    """A copy of every tenant's state that later changes to `engine` leave alone.

    The engine must not change meanwhile; checks may read it (this only reads).
    `copy=False` takes the states' own containers instead, for an engine that nothing
    will change again (a load's part, `sync.pg_load`): no time spent copying.
    """
    return [_capture(state, copy) for state in engine.states()]


def _capture(state: TenantState, copy: bool = True) -> Held:
    roles = empty_tables()
    role_rows(state, roles)
    if not copy:
        return _held(state, roles, {field: getattr(state, field) for field in FIELDS})
    users = state.users.copy()
    for uid, rec in state.users.items():
        if rec[1].__class__ is dict:  # a scope index, changed in place: copied
            users[uid] = (rec[0], rec[1].copy(), rec[2])
    group_grants = _copy(state.group_grants)
    # live_groups holds group_grants' own values: the copy holds the copies, so they
    # stay one object each (`_Pieces` then writes each once).
    live_groups = {
        gid: group_grants[gid] if held is state.group_grants.get(gid) else _copy(held)
        for gid, held in state.live_groups.items()
    }
    fields = {
        "users": users,
        "user_attributes": state.user_attributes.copy(),
        "user_holders": _copy(state.user_holders),
        "members": _copy(state.members),
        "groups": state.groups.copy(),
        "group_grants": group_grants,
        "live_groups": live_groups,
        "group_holders": _copy(state.group_holders),
        "resources": _copy(state.resources),
    }
    assert fields.keys() == set(FIELDS)
    return _held(state, roles, fields)


def _held(state: TenantState, roles: TableRows, fields: dict[str, Any]) -> Held:
    return Held(
        state.tenant_id, state.exists, dict(state.count), state.running_sum(),
        [(entity, roles[entity]) for entity in _ROLE_ENTITIES], fields,
    )  # fmt: skip


def _copy(held: Any) -> Any:
    """A copy of nested dicts (every dict level copied; other values shared)."""
    if held.__class__ is not dict:
        return held
    out = held.copy()
    for key, value in held.items():
        if value.__class__ is dict:
            out[key] = _copy(value)
    return out


def dump(held: list[Held] | Engine, out: Writer) -> None:
    """Write the image of a capture (or of an engine, captured first) to `out`."""
    states = capture(held) if isinstance(held, Engine) else held
    pickler = pickle.Pickler(out, _PROTOCOL)
    pickler.dump(("pdp-engine-image", LAYOUT, len(states)))
    for state in states:
        pickler.dump(
            ("tenant", state.tenant_id, state.exists, state.count, state.total, state.roles)
        )
        pieces = _Pieces()
        for field in FIELDS:
            for piece in pieces.of(field, state.fields[field]):
                pickler.dump(piece)
    pickler.dump(("end",))


class _Pieces:
    """The fields of one state in pieces of about PIECE objects, each in its order.

    A dict comes as `("fill", field, path, keys, values)`: two lists, not a list of
    pairs, so loading makes no (key, value) tuple per item, which would be freed right
    away and leave holes among the objects that stay (50 MB of RSS at 1,000,000
    users). A value that is a dict of more than PIECE entries is written as an empty
    dict in its place, then filled by pieces of its own (its path: `path + (key,)`).
    Such a dict held in two places (a group's scope index in `group_grants` and
    `live_groups`) is filled once and linked from the second place, so it comes back
    as one object, as the memo keeps smaller ones. A set comes as `("add", field,
    path, members)`.
    """

    def __init__(self) -> None:
        self._split: dict[int, tuple[str, Path]] = {}  # id of a split dict -> where

    def of(self, field: str, held: Any, path: Path = ()) -> Iterator[tuple[Any, ...]]:
        if held.__class__ is not dict:
            members = list(held)
            for at in range(0, len(members), PIECE):
                yield ("add", field, path, members[at : at + PIECE])
            return
        if not any(v.__class__ is dict and len(v) > PIECE for v in held.values()):
            # The common case (users, members, ...): slices of as many items as make
            # about PIECE objects, judged by the first values.
            sample = list(islice(held.values(), 64))
            weight = 1 + sum(len(v) if v.__class__ in _SIZED else 0 for v in sample) / max(
                1, len(sample)
            )
            step = max(1, int(PIECE / weight))
            keys, values = iter(held), iter(held.values())  # the same order
            while batch := list(islice(keys, step)):
                yield ("fill", field, path, batch, list(islice(values, step)))
            return
        yield from self._split_items(field, held, path)

    def _split_items(self, field: str, held: dict[Any, Any], path: Path) -> Iterator[Any]:
        """A dict with some values too big for one piece, an item at a time."""
        keys: list[Any] = []
        values: list[Any] = []
        weight = 0
        for key, value in held.items():
            if value.__class__ is dict and len(value) > PIECE:
                keys.append(key)
                values.append({})
                yield ("fill", field, path, keys, values)
                keys, values, weight = [], [], 0
                seen = self._split.get(id(value))
                if seen is None:
                    self._split[id(value)] = (field, (*path, key))
                    yield from self.of(field, value, (*path, key))
                else:
                    yield ("link", field, (*path, key), *seen)
                continue
            keys.append(key)
            values.append(value)
            weight += 1 + (len(value) if value.__class__ in _SIZED else 0)
            if weight >= PIECE:
                yield ("fill", field, path, keys, values)
                keys, values, weight = [], [], 0
        if keys:
            yield ("fill", field, path, keys, values)


_SIZED = (dict, set, tuple, frozenset)


class _Plain(pickle.Unpickler):
    """An unpickler of plain containers only: any class a stream names is refused."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise BadImage(f"it names {module}.{name}; an engine image names no class")


def load(source: IO[bytes], revision: Snapshot) -> Engine:
    """The engine an image holds, at `revision`. Raises BadImage when it is not one.

    CPU-heavy (about PIECE objects per call into the unpickler): call it in a thread.
    """
    reader = _Plain(source)
    try:
        head = reader.load()
        if not (isinstance(head, tuple) and len(head) == 3 and head[0] == "pdp-engine-image"):
            raise BadImage("it does not start as an engine image")
        if head[1] != LAYOUT:
            raise BadImage(f"its engine layout is {head[1]!r}, this pdp reads {LAYOUT}")
        states: dict[str, TenantState] = {}
        state: TenantState | None = None
        while (piece := reader.load())[0] != "end":
            if piece[0] == "tenant":
                state = _tenant(*piece[1:])
                states[state.tenant_id] = state
            elif piece[0] == "fill" and state is not None:
                _fill(state, *piece[1:])
            elif piece[0] == "add" and state is not None:
                _add(state, *piece[1:])
            elif piece[0] == "link" and state is not None:
                _link(state, *piece[1:])
            else:
                raise BadImage(f"a piece of kind {piece[0]!r} where it is not expected")
    except BadImage:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError,
            AttributeError) as exc:  # fmt: skip
        raise BadImage(f"it does not load ({exc.__class__.__name__}: {exc})") from None
    if len(states) != head[2]:
        raise BadImage(f"it holds {len(states)} tenants, its start says {head[2]}")
    for held in states.values():
        held.settle()
    return Engine(states, revision)


def _tenant(
    tenant: str, exists: bool, count: dict[str, int], total: int, roles: list[Any]
) -> TenantState:
    state = TenantState(tenant, loading=True)  # upserts below leave the digest alone
    for entity, rows in roles:
        if entity not in _ROLE_ENTITIES:
            raise BadImage(f"a role graph row of {entity!r}")
        for row in rows:
            state.upsert(entity, tuple(row))
    if count.keys() != state.count.keys():
        raise BadImage("its row counts are not those of the engine's tables")
    state.exists = bool(exists)
    state.count.update(count)
    state.resume_digest(int(total))
    return state


def _at(state: TenantState, field: str, path: Path) -> Any:
    if field not in FIELDS:
        raise BadImage(f"it names {field!r}, not a field of the state")
    target: Any = getattr(state, field)
    for key in path:
        target = target[key]
    return target


def _fill(state: TenantState, field: str, path: Path, keys: list[Any], values: list[Any]) -> None:
    if len(keys) != len(values):
        raise BadImage("a piece with more keys than values, or fewer")
    target = _at(state, field, path)
    if target.__class__ is not dict:
        raise BadImage(f"it fills {field} {path} as a dict, which it is not")
    target.update(zip(keys, values, strict=True))


def _add(state: TenantState, field: str, path: Path, members: list[Any]) -> None:
    target = _at(state, field, path)
    if target.__class__ is not set:
        raise BadImage(f"it adds to {field} {path} as to a set, which it is not")
    target.update(members)


def _link(state: TenantState, field: str, path: Path, src_field: str, src_path: Path) -> None:
    if not path:
        raise BadImage("a link to a whole field")
    _at(state, field, path[:-1])[path[-1]] = _at(state, src_field, src_path)
