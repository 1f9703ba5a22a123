"""The pure decision engine: an in-memory replica of the RBAC tables and the rule.

No I/O, no clock, no awaits: time is a parameter. See README.md beside this file.
"""

from pdp.engine.decision import ActionsResult, Decision, Reason, ResourcesResult
from pdp.engine.digest import digest_lines, render_expiry
from pdp.engine.engine import Engine, Loader, Tables, collector_off
from pdp.engine.rows import COLUMNS, ENTITIES, KEY_WIDTH, REQUIRED, Row, RowChange
from pdp.engine.snapshot import Snapshot
from pdp.engine.tenant import TenantState

__all__ = [
    "COLUMNS",
    "ENTITIES",
    "KEY_WIDTH",
    "REQUIRED",
    "ActionsResult",
    "Decision",
    "Engine",
    "Loader",
    "Reason",
    "ResourcesResult",
    "Row",
    "RowChange",
    "Snapshot",
    "Tables",
    "TenantState",
    "collector_off",
    "digest_lines",
    "render_expiry",
]
