"""The pure gateway layer: path normalization, the route table's validation and matching.

Matching is held to a plain linear scan (the definition of "first match wins") on
random tables and paths; validation errors must name the entry at fault.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdp.errors import ConfigError
from pdp.gateway import PathError, Route, RouteTable, normalize, parse_routes, split_uri
from pdp.gateway.routes import _PARAM

EXAMPLE = """
routes:
  - method: GET
    path: /projects/{project_id}/documents/{doc_id}
    resource: {type: document, id: "{doc_id}"}
    action: read
  - method: [put, PATCH]
    path: /projects/{project_id}/documents/{doc_id}
    resource: {type: document, id: "{project_id}:{doc_id}"}
    action: write
  - path: /projects/{project_id}
  - method: GET
    path: /projects/archive
    resource: {type: archive}
public:
  - GET /healthz
  - "* /docs/{page*}"
default: deny
"""


@pytest.mark.parametrize(
    ("uri", "segments"),
    [
        ("/a/b", ("a", "b")),
        ("/a/b/?x=1#f", ("a", "b")),
        ("//a///b//", ("a", "b")),
        ("/public/../admin", ("admin",)),
        ("/public/%2e%2E/admin", ("admin",)),
        ("/a/./b/../../../c", ("c",)),
        ("/a%2Fb/c%20d", ("a/b", "c d")),
        ("/%7Euser/caf%C3%A9", ("~user", "café")),
        ("http://evil.example/x/../y?q", ("y",)),
        ("/", ()),
    ],
)
def test_normalize(uri: str, segments: tuple[str, ...]) -> None:
    path, _query = split_uri(uri)
    assert normalize(path) == segments


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("relative/path", "not a request path"),
        ("/a/%zz", "malformed percent-escape"),
        ("/a/%4", "malformed percent-escape"),
        ("/a/%ff%fe", "not UTF-8"),
        ("/a/%00b", "control character"),
        ("/" + "a" * 9000, "longer than"),
    ],
)
def test_normalize_refuses(uri: str, message: str) -> None:
    with pytest.raises(PathError, match=message):
        normalize(split_uri(uri)[0])


@pytest.fixture
def table() -> RouteTable:
    return parse_routes(EXAMPLE)


@pytest.mark.parametrize(
    ("method", "uri", "source", "rtype", "rid", "action"),
    [
        ("GET", "/projects/p1/documents/d1", "routes[0]", "document", "d1", "read"),
        ("HEAD", "/projects/p1/documents/d1", "routes[0]", "document", "d1", "read"),
        ("PUT", "/projects/p1/documents/d1", "routes[1]", "document", "p1:d1", "write"),
        ("PATCH", "/projects/p1/documents/d%2F1", "routes[1]", "document", "p1:d/1", "write"),
        ("DELETE", "/projects/p1/documents/d1", None, None, None, None),
        # The profile: route:<METHOD> on the template; a HEAD decided as a GET.
        ("DELETE", "/projects/p1", "routes[2]", "route", "/projects/{project_id}", "DELETE"),
        ("HEAD", "/projects/p1", "routes[2]", "route", "/projects/{project_id}", "GET"),
        # First match wins: routes[2] ({project_id}) comes before the literal archive.
        ("GET", "/projects/archive", "routes[2]", "route", "/projects/{project_id}", "GET"),
        ("GET", "/healthz", "public[0]", "route", "/healthz", "GET"),
        ("POST", "/healthz", None, None, None, None),
        ("POST", "/docs/a/b/c", "public[1]", "route", "/docs/{page*}", "POST"),
        ("GET", "/docs", None, None, None, None),
        ("GET", "/projects/p1/documents", None, None, None, None),
    ],
)
def test_match(
    table: RouteTable, method: str, uri: str, source: str | None, rtype: str | None,
    rid: str | None, action: str | None,
) -> None:  # fmt: skip
    match = table.match(method, normalize(uri))
    if source is None:
        assert match is None
        return
    assert match is not None
    assert (match.route.source, match.resource_type, match.resource_id, match.action(method)) == (
        source, rtype, rid, action,
    )  # fmt: skip


def test_match_gives_the_path_parameters(table: RouteTable) -> None:
    match = table.match("GET", normalize("/projects/p%201/documents/d9"))
    assert match is not None
    assert match.params == {"project_id": "p 1", "doc_id": "d9"}
    tail = table.match("GET", normalize("/docs/guide/intro"))
    assert tail is not None
    assert tail.params == {"page": "guide/intro"}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("routes: [", "not valid YAML"),
        ("- a list", "the top level must be a mapping"),
        ("rutes: []", "unknown key 'rutes'"),
        ("default: maybe", "default must be deny or allow"),
        ("routes: {path: /a}", "routes must be a list"),
        ("routes: [{method: GET}]", r"routes\[0\]: path is required"),
        ("routes: [{path: /a, methd: GET}]", r"routes\[0\]: unknown key 'methd'"),
        ("routes: [{path: a/b}]", r"routes\[0\] \(a/b\): path must be a string starting with '/'"),
        ("routes: [{path: /a, method: FETCH!}]", r"routes\[0\] \(/a\): method 'FETCH!' is not an HTTP"),
        ("routes: [{path: /a, method: []}]", "at least one method"),
        ("routes: [{path: '/a/{id}/{id}'}]", r"parameter \{id\} appears twice"),
        ("routes: [{path: '/a/x{id}'}]", "a parameter is a whole segment"),
        ("routes: [{path: '/a/{rest*}/b'}]", r"\{rest\*\} must be the last segment"),
        ("routes: [{path: /a/../b}]", "write the plain segment"),
        ("routes: [{path: /a, action: 'read it'}]", "action must be a name"),
        ("routes: [{path: '/a/{id}', resource: {id: x}}]", "resource must be"),
        ("routes: [{path: '/a/{id}', resource: {type: doc, id: '{doc}'}}]",
         r"resource.id names \{doc\}, not a parameter of the path \(\{id\}\)"),
        ("routes: [{path: '/a/{id}', resource: {type: doc, id: '{id!r}'}}]", "only plain"),
        ("routes: [{path: '/a/{id}', resource: {type: doc, id: '{id'}}]", "resource.id"),
        ("public: [GET]", r'public\[0\]: must be "METHOD /path"'),
        ("routes: [{path: '/a/{x}'}, {path: /b}, {path: '/a/{y}', method: GET}]",
         r"routes\[2\] \(/a/\{y\}\) can never match: routes\[0\] \(/a/\{x\}\) comes first"),
        ("public: ['GET /h']\nroutes: [{path: /h, method: GET}]", r"routes\[0\] \(/h\) can never match"),
    ],
)  # fmt: skip
def test_a_bad_table_names_the_entry(document: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^routes.yaml: .*{message}"):
        parse_routes(document, "routes.yaml")


def test_an_empty_document_is_an_empty_table_that_denies() -> None:
    table = parse_routes("")
    assert len(table) == 0
    assert table.default_allow is False
    assert table.match("GET", ()) is None
    assert parse_routes("default: allow").default_allow is True


# --- compiled matching == a linear scan ------------------------------------------------

SEGMENTS = ("a", "b", "c")
_template_segment = st.sampled_from(["a", "b", "c", "{p}", "{q}"])


@st.composite
def tables(draw: st.DrawFn) -> list[tuple[str, str]]:
    """(method, path) entries; parameter names made unique per path."""
    entries = []
    for _ in range(draw(st.integers(1, 12))):
        parts = draw(st.lists(_template_segment, min_size=0, max_size=4))
        parts = [f"{{{p[1:-1]}{i}}}" if p.startswith("{") else p for i, p in enumerate(parts)]
        if draw(st.booleans()):
            parts.append(f"{{rest{len(parts)}*}}")
        method = draw(st.sampled_from(["*", "GET", "POST", "GET,POST"]))
        entries.append((method, "/" + "/".join(parts)))
    return entries


def _linear(routes: tuple[Route, ...], method: str, segments: tuple[str, ...]) -> Route | None:
    for route in routes:
        if not route.allows_method(method):
            continue
        template = [s for s in route.template.split("/") if s]
        if template and (tail := _PARAM.match(template[-1])) and tail.group(2):
            fixed = template[:-1]
            if len(segments) <= len(fixed):
                continue
        else:
            fixed = template
            if len(segments) != len(fixed):
                continue
        if all(_PARAM.match(t) or t == s for t, s in zip(fixed, segments, strict=False)):
            return route
    return None


@given(
    entries=tables(),
    path=st.lists(st.sampled_from(SEGMENTS), max_size=5),
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT"]),
)
def test_the_trie_agrees_with_a_linear_scan(
    entries: list[tuple[str, str]], path: list[str], method: str
) -> None:
    lines = [f'  - "{m} {p}"' for m, p in entries]
    document = "public:\n" + "\n".join(lines)
    try:
        table = parse_routes(document)
    except ConfigError as exc:
        refused = str(exc)
        assert "can never match" in refused  # a shadowed entry: refused, fine
        return
    found = table.match(method, tuple(path))
    expected = _linear(table.routes, method, tuple(path))
    assert (found.route if found else None) == expected


def test_the_gateway_layer_is_pure() -> None:
    code = (
        "import pdp.gateway, sys; forbidden = ('aiohttp', 'asyncpg', 'asyncio', 'redis', "
        "'sqlalchemy', 'prometheus_client'); "
        "print(','.join(m for m in forbidden if m in sys.modules))"
    )

    def loaded(module: str) -> str:
        probe = code.replace("pdp.gateway", module)
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
        )
        return result.stdout.strip()

    assert loaded("pdp.gateway") == ""
    # The probe sees what the web edge loads.
    assert {"aiohttp", "asyncio"} <= set(loaded("pdp.web.forward_auth").split(","))
