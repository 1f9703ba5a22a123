"""The PDP metadata document (`/.well-known/authzen-configuration`)."""

from __future__ import annotations

from pdp.protocol.codec import JsonObject


def configuration(base_url: str) -> JsonObject:
    """The `/.well-known/authzen-configuration` document for a PDP at `base_url`."""
    base = base_url.rstrip("/")
    return {
        "policy_decision_point": base,
        "access_evaluation_endpoint": f"{base}/access/v1/evaluation",
        "access_evaluations_endpoint": f"{base}/access/v1/evaluations",
        "search_subject_endpoint": f"{base}/access/v1/search/subject",
        "search_resource_endpoint": f"{base}/access/v1/search/resource",
        "search_action_endpoint": f"{base}/access/v1/search/action",
    }
