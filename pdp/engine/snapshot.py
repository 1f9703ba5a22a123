"""PostgreSQL snapshots (`pg_snapshot`): the engine's revision."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A `pg_snapshot`: transactions below `xmin` are settled, those in `xip` were in progress.

    `str(snapshot)` is PostgreSQL's text form `xmin:xmax:xip1,xip2` (xip ascending),
    and `Snapshot.parse` reads it back.
    """

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    def visible(self, xid: int) -> bool:
        """Whether transaction `xid` had committed (or aborted) as of this snapshot.

        Same rule as `pg_visible_in_snapshot`: below xmin, or below xmax and not in progress.
        """
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """Read `xmin:xmax:xip,...`; raise ValueError on anything else."""
        parts = text.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"not a pg_snapshot: {text!r}")
        xmin, xmax = int(parts[0]), int(parts[1])
        xip = frozenset(int(x) for x in parts[2].split(",") if x)
        if xmin > xmax or any(not xmin <= x < xmax for x in xip):
            raise ValueError(f"inconsistent pg_snapshot: {text!r}")
        return cls(xmin, xmax, xip)

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"
