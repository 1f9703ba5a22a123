"""The async workers that keep a sidecar's replica equal to PostgreSQL (no aiohttp here)."""
