"""Alembic environment and revisions for the `pdp` schema (installed as `pdp.migrations`)."""
