"""The `pdp` command: migrate, seed, serve and the sync workers.

Only this module (the entry point) configures logging and turns errors into exit
codes: a user mistake (bad option, bad URL, database down) prints one line
`pdp: error: ...` and exits non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO, TypeVar

import asyncpg

from pdp import cli_compliance
from pdp.config import OPTIONS, SERVE_FLAGS, Settings, from_environment, redact_url
from pdp.errors import DependencyError, PdpError, UserError
from pdp.pg import migrate, seed, seed_data
from pdp.pg.embedded import database_url
from pdp.pg.errors import describe_database_error, is_database_error

log = logging.getLogger("pdp")

_T = TypeVar("_T")
Handler = Callable[[argparse.Namespace, Settings], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pdp: error: {message} (see {self.prog} --help)\n")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever `sys.stderr` is when a record comes (as logging's
    own last-resort handler does): a stream swapped and closed later (pytest's capture
    of a CLI run) is never written to after it closed."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure_logging(settings: Settings) -> None:
    handler = _Stderr()
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # The embedded server's library narrates every pg_ctl call at INFO.
    logging.getLogger("pgserver").setLevel(max(logging.WARNING, logging.root.level))


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    if args.sql:
        # Offline mode needs only the dialect, never a server.
        migrate.upgrade_sql(settings.database_url or "postgresql://", args.revision)
        return 0
    with database_url(settings) as url:
        asyncio.run(migrate.upgrade(url, args.revision))
    log.info("database at revision %s", args.revision)
    return 0


def _add_migrate(sub: Any) -> None:
    p = sub.add_parser(
        "migrate",
        help="upgrade the database schema to the latest revision",
        description="Create or upgrade the pdp schema (tables, change capture, pdp.check).",
    )
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    p.set_defaults(handler=_cmd_migrate)


def _cmd_seed(args: argparse.Namespace, settings: Settings) -> int:
    sizes = ("tenants", "users", "groups", "roles", "seed", "tenant_prefix", "as_of")
    given = {name: value for name in sizes if (value := getattr(args, name)) is not None}
    if args.demo and given:
        raise UserError(f"--demo takes no --{next(iter(given)).replace('_', '-')}")
    if args.demo:
        dataset = seed_data.demo()
    else:
        given.setdefault("as_of", datetime.now(UTC).date())
        dataset = seed_data.synthetic(seed_data.SeedSpec(**given))
    with database_url(settings) as url:
        summaries = asyncio.run(seed.load(url, dataset, replace=args.replace))
    for summary in summaries:
        print(summary.line())
    return 0


def _add_seed(sub: Any) -> None:
    p = sub.add_parser(
        "seed",
        help="load a synthetic dataset (or the small demo tenant) with COPY",
        description="Load deterministic synthetic tenants with COPY in one transaction,\n"
        "change capture paused, ending with one bulk-load marker per tenant\n"
        "(running sidecars reload those tenants).",
        epilog=seed_data.DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    n = {"type": int, "metavar": "N", "default": None}
    p.add_argument("--tenants", **n, help="number of tenants (default 1)")
    p.add_argument("--users", **n, help="users per tenant (default 1000)")
    p.add_argument("--groups", **n, help="groups per tenant (default users/50, at least 1)")
    p.add_argument("--roles", **n, help="roles per tenant (default 40)")
    p.add_argument("--seed", **n, help="random seed; same seed and sizes, same data (default 1)")
    p.add_argument(
        "--tenant-prefix", metavar="P", help="tenant ids are P-1, P-2, ... (default 'tenant')"
    )
    p.add_argument(
        "--as-of",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="the day expiry dates are relative to (default today, UTC)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="delete tenants with the same ids first (else that is an error)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="load the hand-written 'demo' tenant instead (see below)",
    )
    p.set_defaults(handler=_cmd_seed)


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    if settings.workers > 1:
        from pdp.sidecar_workers import serve_workers  # noqa: PLC0415  (as below)

        return serve_workers(settings)
    from pdp.sidecar import serve  # noqa: PLC0415  (aiohttp only for the commands that serve)

    return serve(settings)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the sidecar: load the data, keep it in sync, answer checks",
        description="Load the pdp tables into memory, follow every change through\n"
        "LISTEN/NOTIFY and the change log, and answer the AuthZEN API\n"
        "(POST /access/v1/evaluation ...), /healthz, /readyz and /metrics.\n"
        "Each flag overrides its PDP_* variable and is checked the same way.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Settings()
    for option in SERVE_FLAGS:
        assert option.flag is not None
        default = _shown(getattr(defaults, option.field))
        p.add_argument(
            option.flag,
            dest=option.field,
            metavar=option.metavar,
            help=f"{option.help} ({option.env}, default {default})",
        )
    p.set_defaults(handler=_cmd_serve)


def _cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    from pdp.sidecar import relay  # noqa: PLC0415  (aiohttp only for the commands that serve)

    return relay(settings)


def _add_relay(sub: Any) -> None:
    p = sub.add_parser(
        "relay",
        help="publish the database's changes to a Redis Stream for sidecars in relay mode",
        description="Run the sidecar's catch-up loop once against PostgreSQL and publish\n"
        "every batch to the Redis Stream PDP_REDIS_STREAM at PDP_REDIS_URL, with a\n"
        "per-tenant snapshot. Run two or more for high availability: one leads\n"
        "(a PostgreSQL advisory lock), the others take over when it fails.\n"
        "Sidecars follow it with PDP_SYNC_SOURCE=redis. /metrics and /healthz on\n"
        "PDP_HOST:PDP_RELAY_PORT.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler=_cmd_relay)


def _shown(default: object) -> str:
    if default is None:
        return "none"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return f"{default:g}" if isinstance(default, float) else str(default)


def _cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from sync import pg_retention  # noqa: PLC0415

    retention = settings.change_retention_seconds
    audit = settings.audit_retention_seconds
    with database_url(settings) as url:
        if args.once:
            result = asyncio.run(pg_retention.prune_once(url, retention, audit))
            print(
                f"removed={result.removed} purge_horizon={result.horizon}"
                f" audit_removed={result.audit_removed}"
            )
            return 0
        asyncio.run(pg_retention.run_forever(url, retention, args.interval, audit))
    return 0


def _add_prune(sub: Any) -> None:
    p = sub.add_parser(
        "prune",
        help="retention worker: sync's change-log window and the audit archive",
        description="Move change_log rows older than PDP_CHANGE_RETENTION (default 7d)\n"
        "into pdp.audit_archive, never those of a transaction newer than the oldest\n"
        "one still running, and record the purge horizon (sidecars behind it reload);\n"
        "then delete archive rows older than PDP_AUDIT_RETENTION (default 400d).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--once", action="store_true", help="prune once and exit (for cron)")
    p.add_argument(
        "--interval",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="seconds between runs when not --once (default 600)",
    )
    p.set_defaults(handler=_cmd_prune)


def _cmd_db_url(args: argparse.Namespace, settings: Settings) -> int:
    # Left running: the URL printed must keep working after this command exits (the
    # next command to exit as the server's last user stops it).
    with database_url(settings, keep_running=True) as url:
        print(url)
    return 0


def _add_db(sub: Any) -> None:
    p = sub.add_parser(
        "db",
        help="the database the commands use (url)",
        description="`pdp db url` prints the PostgreSQL URL every pdp command uses:\n"
        "PDP_DATABASE_URL when set (as given, password included), else the\n"
        "embedded server's, which it starts or reuses and leaves running.\n"
        'e.g. psql "$(pdp db url)"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    url = actions.add_parser("url", help="print the URL (starting the embedded server if needed)")
    url.set_defaults(handler=_cmd_db_url)


def _cmd_api_key_create(args: argparse.Namespace, settings: Settings) -> int:
    from pdp.web.api_keys import key_line, new_key  # noqa: PLC0415

    path = args.file or settings.api_keys_file
    if path is None:
        raise UserError("give --file or set PDP_API_KEYS_FILE")
    key = new_key()
    line = key_line(args.name, key)
    path = Path(path)
    created = not path.exists()
    with path.open("a", encoding="utf-8") as out:
        if created:
            path.chmod(0o600)
        out.write(line + "\n")
    log.info("added key %r to %s", args.name, path)
    print(key)  # the only time the key is shown: the file keeps its hash
    return 0


def _add_api_key(sub: Any) -> None:
    p = sub.add_parser(
        "api-key",
        help="manage the check API's keys (PDP_API_KEYS_FILE)",
        description="Keys for PEP authentication on the check API. The file keeps only\n"
        "each key's SHA-256; the key itself is printed once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    create = actions.add_parser("create", help="make a key, append its hash to the file, print it")
    create.add_argument("--name", required=True, help="who the key is for (shown in no response)")
    create.add_argument("--file", type=Path, help="the keys file (default PDP_API_KEYS_FILE)")
    create.set_defaults(handler=_cmd_api_key_create)


def _parsed(flag: str, parse: Callable[[str], _T], text: str) -> _T:
    """parse(text); a ValueError becomes `pdp: error: FLAG: ...`."""
    try:
        return parse(text)
    except ValueError as exc:
        raise UserError(f"{flag}: {exc}") from None


def _cmd_admin_token(args: argparse.Namespace, settings: Settings) -> int:
    from pdp.admin import token_store, tokens  # noqa: PLC0415

    if args.action == "create":  # checked before any connection is made
        scopes = _parsed("--scopes", tokens.parse_scopes, args.scopes)
        expires = None if args.expires is None else _parsed(
            "--expires", tokens.parse_duration, args.expires
        )  # fmt: skip

    async def run(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            if args.action == "create":
                made = await token_store.create(conn, args.name, scopes, args.tenant, expires)
                log.info("created admin token %r (id %s)", args.name, made.id)
                print(made.text)  # the only time it is shown: the database keeps its digest
            elif args.action == "list":
                for info in await token_store.list_all(conn):
                    print(info.line())
            else:
                await token_store.revoke(conn, args.name)
                log.info("revoked admin token %r", args.name)
        finally:
            await conn.close()

    with database_url(settings) as url:
        asyncio.run(run(url))
    return 0


def _cmd_admin_serve(args: argparse.Namespace, settings: Settings) -> int:
    from pdp.admin.service import serve  # noqa: PLC0415

    if settings.admin_database_url:
        log.info("admin API database: %s", redact_url(settings.admin_database_url))
        return serve(settings, settings.admin_database_url)
    with database_url(settings) as url:
        return serve(settings, url)


def _add_admin(sub: Any) -> None:
    p = sub.add_parser(
        "admin",
        help="the admin API: serve it, manage its tokens",
        description="Admin tokens are stored in PostgreSQL as the SHA-256 of their secret;\n"
        "a token is printed once, when it is created. Runs as the database owner.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT", parser_class=_Parser)
    token = what.add_parser("token", help="create, list or revoke admin tokens")
    actions = token.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )
    create = actions.add_parser("create", help="make a token, store its digest, print it once")
    create.add_argument("--name", required=True, help="who holds it (the actor of its writes)")
    create.add_argument(
        "--scopes", required=True, metavar="S[,S]", help="read, write, admin (comma-separated)"
    )
    create.add_argument("--tenant", metavar="T", help="bind it to one tenant (default: platform)")
    create.add_argument("--expires", metavar="DURATION", help="e.g. 30d, 12h (default: never)")
    actions.add_parser("list", help="every token, without secrets")
    serve = what.add_parser(
        "serve",
        help="run the admin API (PDP_ADMIN_HOST:PDP_ADMIN_PORT; off until a token exists)",
    )
    serve.set_defaults(handler=_cmd_admin_serve)
    revoke = actions.add_parser("revoke", help="revoke a token by name (the next request fails)")
    revoke.add_argument("--name", required=True)
    token.set_defaults(handler=_cmd_admin_token)


def _cmd_policy(args: argparse.Namespace, settings: Settings) -> int:
    from pdp.admin import policy, policy_store  # noqa: PLC0415
    from pdp.admin.store import connect  # noqa: PLC0415

    text = None
    if args.command in ("plan", "apply"):
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {args.file}: {exc}") from None

    async def run(url: str) -> None:
        conn = await connect(url)
        try:
            async with conn.transaction():
                if text is None:  # export
                    state = await policy_store.read_state(conn, args.tenant)
                    known = await conn.fetchval(
                        "SELECT 1 FROM pdp.tenants WHERE id = $1", args.tenant
                    )
                    if known is None:
                        raise UserError(f"unknown tenant {args.tenant!r}")
                    sys.stdout.write(policy.export(args.tenant, state))
                    return
                actor = getattr(args, "actor", None) or Path(args.file).name
                await conn.execute("SELECT set_config('pdp.actor', $1, true)", actor)
                outcome = await policy_store.plan_or_apply(
                    conn, text, args.file, tenant=args.tenant, write=args.command == "apply"
                )
        finally:
            await conn.close()
        found = outcome.to_json()
        for line in found["changes"] or ["no changes"]:
            print(line)
        if found["effect"]:
            print("effect:")
            for line in found["effect"]:
                print(f"  {line}")
        if outcome.revision is not None:
            print(f"revision {outcome.revision}")

    with database_url(settings) as url:
        asyncio.run(run(url))
    return 0


def _add_policy(sub: Any) -> None:
    for name, does in (
        ("plan", "print what applying FILE would change, and who gains or loses what"),
        ("apply", "write FILE's changes in one transaction and print the revision"),
    ):
        p = sub.add_parser(name, help=does, description=f"Policy as code: {does}.")
        p.add_argument("file", metavar="FILE", help="the tenant's policy (YAML or JSON)")
        p.add_argument("--tenant", metavar="T", help="the tenant (default: the file's 'tenant')")
        if name == "apply":
            p.add_argument("--actor", help="recorded as the writer (default: the file's name)")
        p.set_defaults(handler=_cmd_policy)
    p = sub.add_parser("export", help="write a tenant's policy (YAML) to stdout")
    p.add_argument("--tenant", required=True, metavar="T")
    p.set_defaults(handler=_cmd_policy)


_GRANT = """
INSERT INTO pdp.role_permissions (tenant_id, role_id, permission, condition)
VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, role_id, permission) DO UPDATE SET condition = EXCLUDED.condition
RETURNING pg_current_xact_id()::text
"""


async def _write_grant(url: str, args: argparse.Namespace) -> str:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(url)
    try:
        revision: str = await conn.fetchval(
            _GRANT, args.tenant, args.role, args.permission, args.condition
        )
    finally:
        await conn.close()
    return revision


def _cmd_grant(args: argparse.Namespace, settings: Settings) -> int:
    from pdp.conditions import validate  # noqa: PLC0415

    if args.condition is not None:
        problem = validate(args.condition)
        if problem is not None:
            raise UserError(f"--condition does not compile: {problem}")
    with database_url(settings) as url:
        revision = asyncio.run(_write_grant(url, args))
    print(f"revision={revision}")
    return 0


def _add_grant(sub: Any) -> None:
    p = sub.add_parser(
        "grant",
        help="give a role a permission, optionally under a CEL condition",
        description="Upserts one pdp.role_permissions row. A --condition that does not\n"
        "compile is rejected before anything is written (exit 2).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tenant", required=True, help="the tenant id")
    p.add_argument("role", help="the role id (it must exist)")
    p.add_argument("permission", help="type:action, `*` allowed on either side")
    p.add_argument("--condition", help="a CEL expression that must be true for the grant")
    p.set_defaults(handler=_cmd_grant)


COMMANDS: list[Callable[[Any], None]] = [
    _add_migrate,
    _add_seed,
    _add_serve,
    _add_relay,
    _add_prune,
    _add_api_key,
    _add_admin,
    _add_policy,
    _add_db,
    _add_grant,
    *cli_compliance.COMMANDS,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pdp",
        description="pdp: a sidecar policy decision point for PostgreSQL-backed RBAC.",
        epilog="Configuration comes from PDP_* environment variables (see README); "
        "PDP_DATABASE_URL selects the database, else an embedded one is started.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for add in COMMANDS:
        add(sub)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"pdp: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Flags are raw text here: Settings parses them exactly as their variables.
        settings = from_environment({o.field: getattr(args, o.field, None) for o in OPTIONS})
        configure_logging(settings)
        handler: Handler = args.handler
        return handler(args, settings)
    except UserError as exc:
        return _fail(str(exc), 2)
    except (DependencyError, PdpError) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if is_database_error(exc):
            return _fail(describe_database_error(exc), 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
