"""pdp: a sidecar policy decision point for PostgreSQL-backed RBAC."""

__version__ = "0.1.0"
