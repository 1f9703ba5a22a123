"""The compliance commands of `pdp`: audit, access-review, erase-subject.

They run as the database owner (like `pdp export`), stream their output to stdout
as PostgreSQL renders it (COPY or a server-side cursor; constant memory), and turn
a bad option into `pdp: error: ...` through the caller's UserError handling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import asyncpg

from pdp.admin import access_review, audit, erasure
from pdp.config import Settings
from pdp.errors import RequestError, UserError
from pdp.pg.embedded import database_url


def _time(flag: str) -> Callable[[str], datetime]:
    def parse(text: str) -> datetime:
        try:
            return audit.parse_time(flag, text)
        except RequestError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return parse


def _key_field(text: str) -> tuple[str, str]:
    column, sep, value = text.partition("=")
    if not sep or not column or not value:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE, got {text!r}")
    return column, value


SIGPIPE_EXIT = 141  # what a shell reports for a writer killed by SIGPIPE


def _to_stdout(run: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run an export; a reader that stops early (`| head`) ends it quietly."""
    try:
        asyncio.run(run())
    except BrokenPipeError:
        pass
    except Exception as exc:
        if not isinstance(exc.__cause__ or exc.__context__, BrokenPipeError):
            raise
    else:
        return 0
    # Python would flush stdout again at exit and report the same broken pipe.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return SIGPIPE_EXIT


# --- pdp audit -------------------------------------------------------------------------


def _cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    try:
        found = audit.AuditFilter(
            tenant=args.tenant, actor=args.actor, entity=args.entity, key=dict(args.key or []),
            since=args.since, until=args.until, txid=args.txid,
        ).checked()  # fmt: skip
    except RequestError as exc:
        raise UserError(f"--{exc.field}: {exc.message}" if exc.field else exc.message) from None

    out = sys.stdout.buffer

    async def write(data: bytes) -> None:
        out.write(data)

    async def run() -> None:
        with database_url(settings) as url:
            conn = await asyncpg.connect(url)
            try:
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    await audit.export(conn, found, args.format, write)
            finally:
                await conn.close()
        out.flush()

    return _to_stdout(run)


def _add_audit(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="export the audit trail (change log and archive) as JSON lines or CSV",
        description="Every change-log and audit-archive row matching the filters, in id\n"
        "order, streamed (constant memory), with the columns id, txid, tenant_id,\n"
        "entity, op, key, old, new, actor, changed_at (CSV: key/old/new as JSON).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tenant", metavar="T", help="one tenant's rows (default: every tenant's)")
    p.add_argument("--actor", metavar="A", help="rows written by this actor")
    p.add_argument("--entity", metavar="E", help=f"one table: {', '.join(audit.ENTITIES)}")
    p.add_argument(
        "--key", metavar="COLUMN=VALUE", type=_key_field, action="append",
        help="a key field, e.g. user_id=alice (repeatable; all must match)",
    )  # fmt: skip
    p.add_argument("--since", metavar="TS", type=_time("--since"), help="changed at or after TS")
    p.add_argument("--until", metavar="TS", type=_time("--until"), help="changed before TS")
    p.add_argument("--txid", metavar="N", type=int, help="one transaction's rows")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.set_defaults(handler=_cmd_audit)


# --- pdp access-review -------------------------------------------------------------------


def _cmd_access_review(args: argparse.Namespace, settings: Settings) -> int:
    out = sys.stdout.buffer

    async def write(data: bytes) -> None:
        out.write(data)

    async def run() -> None:
        with database_url(settings) as url:
            conn = await asyncpg.connect(url)
            try:
                # One snapshot: a past state is rebuilt by several statements.
                async with conn.transaction(isolation="repeatable_read"):
                    await _review(conn, args, write)
            finally:
                await conn.close()
        out.flush()

    return _to_stdout(run)


async def _review(conn: asyncpg.Connection, args: argparse.Namespace, write: audit.Write) -> None:
    known = await conn.fetchval("SELECT 1 FROM pdp.tenants WHERE id = $1", args.tenant)
    if known is None and args.at is None:
        raise UserError(f"unknown tenant {args.tenant!r}")
    at = args.at if args.at is not None else await conn.fetchval("SELECT now()")
    try:
        query = await access_review.prepare(
            conn, args.tenant, at, past=args.at is not None, since=args.since
        )
    except RequestError as exc:
        raise UserError(exc.message) from None
    await access_review.export(conn, query, args.format, write)


def _add_access_review(sub: Any) -> None:
    p = sub.add_parser(
        "access-review",
        help="every user's effective permissions and what grants them (now, past, or a diff)",
        description="One row per grant path: user_id, permission, role, path (the\n"
        "inheritance chain joined by '>'), via_group, scope, expires_at, condition.\n"
        "--at rebuilds a past state from the change log and its archive (as far back\n"
        "as PDP_AUDIT_RETENTION keeps it); --since prints what was gained and lost\n"
        "between TS and --at (default now), with a first column `change`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tenant", metavar="T", required=True)
    p.add_argument("--at", metavar="TS", type=_time("--at"), help="a past moment (default now)")
    p.add_argument("--since", metavar="TS", type=_time("--since"), help="diff from TS to --at")
    p.add_argument(
        "--format", choices=("csv", "json", "jsonl"), default="csv",
        help="csv (default), json (one array) or jsonl (one object a line)",
    )  # fmt: skip
    p.set_defaults(handler=_cmd_access_review)


# --- pdp erase-subject -------------------------------------------------------------------


def _cmd_erase_subject(args: argparse.Namespace, settings: Settings) -> int:
    key = erasure.read_key(settings.pseudonym_key_file)  # before any connection

    async def run(url: str) -> erasure.Erased:
        conn = await asyncpg.connect(url)
        try:
            return await erasure.erase(conn, args.tenant, args.user, key)
        finally:
            await conn.close()

    with database_url(settings) as url:
        erased = asyncio.run(run(url))
    for line in erased.lines():
        print(line)
    return 0


def _add_erase_subject(sub: Any) -> None:
    p = sub.add_parser(
        "erase-subject",
        help="GDPR erasure: delete a user, pseudonymise their history (one transaction)",
        description="Delete the user with their group memberships and role assignments\n"
        "(captured: sidecars follow), and replace the user id in the change log and\n"
        "the audit archive by a keyed hash (HMAC-SHA256 with PDP_PSEUDONYM_KEY_FILE):\n"
        "records stay linkable without naming the person. Prints what changed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tenant", metavar="T", required=True)
    p.add_argument("--user", metavar="U", required=True)
    p.set_defaults(handler=_cmd_erase_subject)


COMMANDS: list[Callable[[Any], None]] = [_add_audit, _add_access_review, _add_erase_subject]
