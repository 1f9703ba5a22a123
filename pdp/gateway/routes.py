"""The route table of `/forward-auth` (`PDP_ROUTES`): parsed, validated, compiled.

    routes:
      - method: GET                       # a method, a list of them, or "*"
        path: /projects/{project_id}/documents/{doc_id}
        resource: {type: document, id: "{doc_id}"}
        action: read
      - method: "*"                       # no resource/action: the API-gateway profile,
        path: /projects/{project_id}      #   route:<METHOD> on route:/projects/{project_id}
    public:                               # answered 200 with no subject
      - GET /healthz
      - GET /docs/{page*}                 # {name*} at the end: one or more segments
    default: deny                         # unmatched requests: deny (or allow)

Public entries come before the routes; among all of them the first that matches the
method and the normalized path wins (`GET` also matches `HEAD`). Matching is a
segment trie walked once per request, pruned by the lowest entry index below each
node, so its cost follows the path's depth, not the table's length.

Every mistake raises `ConfigError` naming the entry (`routes[3]`, `public[0]`) and
the key at fault; nothing here reads a file.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml

from pdp.errors import ConfigError
from pdp.gateway.paths import PathError, normalize

ROUTE_TYPE = "route"  # the resource type of the API-gateway profile
MAX_NAME_LENGTH = 256
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,255}$")  # as the database's type and action
_METHOD = re.compile(r"^[A-Z][A-Z-]{0,31}$")
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]{0,63})(\*?)\}$")
_ROUTE_KEYS = frozenset({"method", "path", "resource", "action"})
_TOP_KEYS = frozenset({"routes", "public", "default"})
# libyaml's loader when PyYAML has it (its wheels do): 8x faster on a 2,000-entry table.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class Route:
    """One entry. `methods` None matches any method; `action` None means the method."""

    index: int
    source: str  # "routes[3]" or "public[0]": how messages name it
    methods: frozenset[str] | None
    template: str
    params: tuple[str, ...]  # names of the path parameters, in path order
    public: bool
    resource_type: str = ROUTE_TYPE
    resource_id: str | None = None  # a str.format template over params; None: the template
    action: str | None = None
    id_param: str | None = None  # set when resource_id is exactly "{name}"

    def allows_method(self, method: str) -> bool:
        return self.methods is None or method in self.methods


class Match(NamedTuple):
    """A route matched by a request, with its path parameters (a tuple: built per request)."""

    route: Route
    params: dict[str, str]

    @property
    def resource_type(self) -> str:
        return self.route.resource_type

    @property
    def resource_id(self) -> str:
        route = self.route
        if route.id_param is not None:  # the common `id: "{name}"`: no formatting
            return self.params[route.id_param]
        template = route.resource_id
        return route.template if template is None else template.format_map(self.params)

    def action(self, method: str) -> str:
        """The route's action, else the method (a HEAD is decided as the GET it mirrors)."""
        return self.route.action or ("GET" if method == "HEAD" else method)


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    param: _Node | None = None
    ends: list[Route] = field(default_factory=list)  # routes whose path ends here
    tails: list[Route] = field(default_factory=list)  # routes with a {name*} from here
    lowest: int = 1 << 30  # the lowest route index in this subtree (for pruning)


class RouteTable:
    """Compiled entries; `match` finds the first one that applies. Immutable once built."""

    def __init__(self, routes: Sequence[Route], default_allow: bool) -> None:
        self.routes = tuple(routes)
        self.default_allow = default_allow
        self._root = _Node()
        for route in self.routes:
            self._insert(route)

    def __len__(self) -> int:
        return len(self.routes)

    def _insert(self, route: Route) -> None:
        node = self._root
        node.lowest = min(node.lowest, route.index)
        for segment in _template_segments(route.template):
            param = _PARAM.match(segment)
            if param is not None and param.group(2):
                node.tails.append(route)
                return
            if param is not None:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node = node.literal.setdefault(segment, _Node())
            node.lowest = min(node.lowest, route.index)
        node.ends.append(route)

    def match(self, method: str, segments: tuple[str, ...]) -> Match | None:
        """The first entry matching `method` on the normalized `segments`, or None.

        A depth-first walk over every branch that can still beat the best entry found
        (a node whose lowest index is not lower is skipped), literal children first.
        """
        best: Route | None = None
        best_values: tuple[str, ...] = ()
        end = len(segments)
        stack: list[tuple[_Node, int, tuple[str, ...]]] = [(self._root, 0, ())]
        while stack:
            node, depth, values = stack.pop()
            if best is not None and node.lowest >= best.index:
                continue
            if depth == end:
                for route in node.ends:  # in index order: the first that fits is the best
                    if (best is None or route.index < best.index) and (
                        route.methods is None or method in route.methods
                    ):
                        best, best_values = route, values
                        break
                continue
            for route in node.tails:
                if (best is None or route.index < best.index) and (
                    route.methods is None or method in route.methods
                ):
                    best, best_values = route, (*values, "/".join(segments[depth:]))
                    break
            segment = segments[depth]
            if node.param is not None:
                stack.append((node.param, depth + 1, (*values, segment)))
            child = node.literal.get(segment)
            if child is not None:
                stack.append((child, depth + 1, values))
        if best is None:
            return None
        return Match(best, dict(zip(best.params, best_values, strict=True)))


# --- parsing --------------------------------------------------------------------------


def parse_routes(text: str, source: str = "PDP_ROUTES") -> RouteTable:
    """The table described by YAML `text`; ConfigError naming `source` and the entry."""
    try:
        document = yaml.load(text, Loader=_LOADER)  # noqa: S506 -- a safe loader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    try:
        return build_table(document)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def build_table(document: object) -> RouteTable:
    """The table of an already decoded document (a mapping of routes/public/default)."""
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        raise ConfigError("the top level must be a mapping with routes, public and default")
    unknown = sorted(str(k) for k in document if k not in _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} (expected routes, public, default)")
    default = document.get("default", "deny")
    if default not in ("deny", "allow"):
        raise ConfigError(f"default must be deny or allow, not {default!r}")
    entries: list[Route] = []
    for i, item in enumerate(_sequence(document, "public")):
        entries.append(_public(len(entries), f"public[{i}]", item))
    for i, item in enumerate(_sequence(document, "routes")):
        entries.append(_route(len(entries), f"routes[{i}]", item))
    _refuse_unreachable(entries)
    return RouteTable(entries, default_allow=default == "allow")


def _sequence(document: Mapping[str, Any], key: str) -> list[Any]:
    value = document.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list")
    return value


def _public(index: int, where: str, item: object) -> Route:
    if not isinstance(item, str) or len(item.split()) != 2:
        raise ConfigError(f'{where}: must be "METHOD /path" (e.g. "GET /healthz"), got {item!r}')
    method_text, path = item.split()
    methods = _methods(method_text.split(",") if method_text != "*" else "*", where)
    template, params = _path(path, where)
    return Route(index, where, methods, template, params, public=True)


def _route(index: int, where: str, item: object) -> Route:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: must be a mapping with method, path, resource, action")
    unknown = sorted(str(k) for k in item if k not in _ROUTE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    if "path" not in item:
        raise ConfigError(f"{where}: path is required")
    where_named = f"{where} ({item['path']})"
    methods = _methods(item.get("method", "*"), where_named)
    template, params = _path(item["path"], where_named)
    action = item.get("action")
    if action is not None and not _is_name(action):
        raise ConfigError(f"{where_named}: action must be a name like read, got {action!r}")
    resource = item.get("resource")
    if resource is None:
        return Route(index, where, methods, template, params, False, action=action)
    rtype, rid = _resource(resource, params, where_named)
    whole = _PARAM.match(rid)
    id_param = whole.group(1) if whole is not None and not whole.group(2) else None
    return Route(index, where, methods, template, params, False, rtype, rid, action, id_param)


def _methods(value: object, where: str) -> frozenset[str] | None:
    if value == "*":
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"{where}: method must name at least one method")
    methods: set[str] = set()
    for item in items:
        method = item.strip().upper() if isinstance(item, str) else None
        if method == "*":
            return None
        if method is None or not _METHOD.match(method):
            raise ConfigError(f"{where}: method {item!r} is not an HTTP method (or '*')")
        methods.add(method)
    if "GET" in methods:
        methods.add("HEAD")  # a HEAD is a GET without the body: same decision
    return frozenset(methods)


def _path(value: object, where: str) -> tuple[str, tuple[str, ...]]:
    """(the template as matched: normalized, the parameter names)."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{where}: path must be a string starting with '/', got {value!r}")
    params: list[str] = []
    segments = [s for s in value.split("/") if s]
    for position, segment in enumerate(segments):
        param = _PARAM.match(segment)
        if param is None:
            if "{" in segment or "}" in segment:
                raise ConfigError(
                    f"{where}: path segment {segment!r}: a parameter is a whole segment, "
                    "{name} or {name*} (last segment only)"
                )
            if segment in (".", "..") or "%" in segment:
                raise ConfigError(f"{where}: path segment {segment!r}: write the plain segment")
            continue
        name, tail = param.groups()
        if tail and position != len(segments) - 1:
            raise ConfigError(f"{where}: {{{name}*}} must be the last segment")
        if name in params:
            raise ConfigError(f"{where}: path parameter {{{name}}} appears twice")
        params.append(name)
    try:  # a literal path must survive normalization unchanged
        normalize(value)
    except PathError as exc:
        raise ConfigError(f"{where}: path: {exc}") from None
    return "/" + "/".join(segments), tuple(params)


def _resource(value: object, params: tuple[str, ...], where: str) -> tuple[str, str]:
    if not isinstance(value, Mapping) or set(value) - {"type", "id"} or "type" not in value:
        raise ConfigError(f"{where}: resource must be {{type: T, id: ...}}, got {value!r}")
    rtype, rid = value["type"], value.get("id", "*")
    if not _is_name(rtype):
        raise ConfigError(f"{where}: resource.type must be a name like document, got {rtype!r}")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_NAME_LENGTH:
        raise ConfigError(f"{where}: resource.id must be a non-empty string, got {rid!r}")
    try:
        fields = [name for _, name, spec, conv in string.Formatter().parse(rid) if name is not None]
        specs = [(spec, conv) for _, name, spec, conv in string.Formatter().parse(rid) if name]
    except ValueError as exc:
        raise ConfigError(f"{where}: resource.id {rid!r}: {exc}") from None
    for name in fields:
        if name not in params:
            known = ", ".join(f"{{{p}}}" for p in params) or "none"
            raise ConfigError(
                f"{where}: resource.id names {{{name}}}, not a parameter of the path ({known})"
            )
    if any(spec or conv for spec, conv in specs):
        raise ConfigError(f"{where}: resource.id: only plain {{name}} placeholders are allowed")
    return rtype, rid


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(_NAME.match(value))


def _template_segments(template: str) -> list[str]:
    return [s for s in template.split("/") if s]


def _shape(route: Route) -> tuple[str, ...]:
    """The template with parameter names erased: equal shapes match the same paths."""
    return tuple(
        ("{*}" if m.group(2) else "{}") if (m := _PARAM.match(s)) else "=" + s
        for s in _template_segments(route.template)
    )


def _refuse_unreachable(entries: list[Route]) -> None:
    """An entry that an earlier one of the same shape always wins over is a mistake."""
    seen: dict[tuple[str, ...], list[Route]] = {}
    for route in entries:
        for earlier in seen.get(_shape(route), ()):
            if earlier.methods is None or (
                route.methods is not None and route.methods <= earlier.methods
            ):
                raise ConfigError(
                    f"{route.source} ({route.template}) can never match: {earlier.source} "
                    f"({earlier.template}) comes first and matches every request it would"
                )
        seen.setdefault(_shape(route), []).append(route)
