"""The CI regression guard's judgement (`loadtests.guard.verdict`): baseline + measured
ratio -> pass or fail, failing only below 0.8 of the baseline ratio."""

from __future__ import annotations

import json

import pytest

from loadtests.guard import BASELINE, THRESHOLD, verdict


def test_a_ratio_at_or_above_the_floor_passes() -> None:
    baseline = {"http_ratio": 0.7, "engine_median_ns": 2000}
    for ratio in (0.9, 0.7, 0.56 + 1e-9):
        assert verdict(baseline, ratio).ok, ratio
    assert verdict(baseline, 0.7).message.startswith("HTTP ratio 0.70 is 100% of")


def test_a_ratio_below_the_floor_fails_and_says_so() -> None:
    result = verdict({"http_ratio": 0.7}, 0.55)
    assert not result.ok
    assert result.floor == pytest.approx(0.56)
    assert result.message.startswith("REGRESSION: HTTP ratio 0.55 is 79% of the baseline 0.70")


def test_the_threshold_is_a_share_of_the_baseline() -> None:
    assert THRESHOLD == 0.8
    assert verdict({"http_ratio": 1.0}, 0.79, threshold=0.8).ok is False
    assert verdict({"http_ratio": 1.0}, 0.79, threshold=0.75).ok is True


def test_a_baseline_without_a_positive_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        verdict({"http_ratio": 0}, 0.5)
    with pytest.raises(KeyError):
        verdict({}, 0.5)


def test_the_committed_baseline_is_judgeable() -> None:
    baseline = json.loads(BASELINE.read_text())
    assert verdict(baseline, baseline["http_ratio"]).ok
    assert baseline["engine_median_ns"] > 0
