"""The promotion gate: a pure function of recorded evidence and the promote params."""

from __future__ import annotations

from lightclip.config import PromoteConfig
from dataclasses import replace

from lightclip.registry.gate import (
    TAG_ENCODE_MS,
    TAG_FRACTION_HIGH,
    TAG_FRACTION_INTERVAL,
    TAG_FRACTION_LOW,
    TAG_MEAN_RECALL,
    TAG_TEACHER_RECALL,
    TAG_TEST_SET,
    Evidence,
    gate,
    gate_tag,
)

CONFIG = PromoteConfig(min_teacher_fraction=0.9, max_encode_ms=10, max_regression=1.0, teacher_fraction_decision="point")
GOOD = Evidence(version="2", mean_recall=57.0, teacher_mean_recall=60.0, encode_ms=3.0, test_set="t1")


def test_gate_rules():
    assert gate(GOOD, None, CONFIG).passed
    assert gate(GOOD, Evidence("1", 57.5, 60.0, 3.0, "t1"), CONFIG).passed  # within the margin
    worse = gate(GOOD, Evidence("1", 58.5, 60.0, 3.0, "t1"), CONFIG)
    assert not worse.passed and worse.failures == ["regression: test mean recall 57.00 < @staging v1's 58.50 - 1 = 57.50"]
    other_set = gate(GOOD, Evidence("1", 90.0, 60.0, 3.0, "t0"), CONFIG)
    assert other_set.passed and "regression: skipped: not comparable" in " ".join(other_set.reasons)
    strict = CONFIG.model_copy(update={"require_same_test_set": True})
    assert not gate(GOOD, Evidence("1", 90.0, 60.0, 3.0, "t0"), strict).passed
    slow = gate(Evidence("2", 57.0, 60.0, 11.0, "t1"), None, CONFIG)
    assert [c.name for c in slow.checks if c.passed is False] == ["latency"]
    unknown = gate(Evidence("2", None, None, None, None), None, CONFIG)
    assert {c.name for c in unknown.checks if c.passed is False} == {"teacher_fraction", "latency"}
    assert gate(GOOD, Evidence("2", 57.0, 60.0, 3.0, "t1"), CONFIG).passed  # it is the holder itself


def test_teacher_fraction_reason_states_the_numbers():
    low = gate(Evidence("2", 40.0, 60.0, 3.0, "t1"), None, CONFIG)
    assert [c.verdict for c in low.checks] == ["fail", "pass", "pass"]
    assert low.failures == ["teacher_fraction: test mean recall 40.00 < 0.9 x teacher's 60.00 = 54.00 (it is 66.7% of the teacher)"]
    assert gate(GOOD, None, CONFIG).checks[0].reason == "test mean recall 57.00 >= 0.9 x teacher's 60.00 = 54.00 (it is 95.0% of the teacher)"


def test_evidence_comes_from_version_tags_and_unreadable_numbers_are_missing():
    tags = {TAG_MEAN_RECALL: "57.000000", TAG_TEACHER_RECALL: "60.0", TAG_ENCODE_MS: "not a number", TAG_TEST_SET: "abc"}
    assert Evidence.from_tags(3, tags) == Evidence(version="3", mean_recall=57.0, teacher_mean_recall=60.0, encode_ms=None, test_set="abc")
    assert Evidence.from_tags("4", {}) == Evidence("4", None, None, None, None)


def test_one_result_renders_the_tags_and_the_card_section():
    result = gate(Evidence("2", 57.0, 60.0, 11.0, "t1"), Evidence("1", 90.0, 60.0, 3.0, "t0"), CONFIG, alias="production")
    assert [c.verdict for c in result.checks] == ["pass", "fail", "skipped"] and result.verdict == "fail"
    prefix = gate_tag("production")
    assert prefix == "lightclip.gate.production"
    tags = result.tags(at="2030-01-01T00:00:00.000+00:00")
    assert tags[prefix] == "fail" and tags[f"{prefix}.checked_at"] == "2030-01-01T00:00:00.000+00:00"
    assert tags[f"{prefix}.reasons"] == "latency: encode p50 11.00 ms > 10 ms"
    assert tags[f"{prefix}.latency"] == "fail: encode p50 11.00 ms > 10 ms"
    assert tags[f"{prefix}.regression"].startswith("skipped: not comparable: @production v1 was evaluated on test set t0")
    assert set(tags) == {prefix, f"{prefix}.checked_at", f"{prefix}.reasons"} | {f"{prefix}.{c.name}" for c in result.checks}
    card = result.markdown().splitlines()
    assert card[0] == "## Promotion gate (@production): fail" and card[1:] == [f"- {r}" for r in result.reasons]
    assert gate(GOOD, None, CONFIG).tags(at="x")[f"{gate_tag('staging')}.reasons"] == "all checks passed"


def _fraction(evidence: Evidence, decision: str):
    return gate(evidence, None, CONFIG.model_copy(update={"teacher_fraction_decision": decision})).checks[0]


def test_the_interval_decides_when_the_test_set_cannot_tell_the_ratio_from_the_bound():
    # 89.0% of the teacher, 95% interval 86.5-91.5%: the test set cannot tell it from 90%
    near = Evidence("2", 53.4, 60.0, 3.0, "t1", fraction_low=0.865, fraction_high=0.915, fraction_interval="95% interval 86.5%-91.5%")
    assert [_fraction(near, d).passed for d in ("point", "interval", "strict")] == [False, True, False]
    assert _fraction(near, "interval").reason == (
        "test mean recall 53.40 < 0.9 x teacher's 60.00 = 54.00 (it is 89.0% of the teacher; 95% interval 86.5%-91.5%; "
        "decision interval: the interval reaches 90%: the test set cannot tell it from 90%)")
    assert _fraction(near, "strict").reason.endswith("decision strict: its lower end < 90%)")
    below = replace(near, mean_recall=48.0, fraction_low=0.76, fraction_high=0.84, fraction_interval="95% interval 76.0%-84.0%")
    assert [_fraction(below, d).passed for d in ("point", "interval", "strict")] == [False, False, False]
    assert _fraction(below, "interval").reason.endswith("decision interval: the whole interval is below 90%)")
    clear = replace(near, mean_recall=57.0, fraction_low=0.92, fraction_high=0.98, fraction_interval="95% interval 92.0%-98.0%")
    assert [_fraction(clear, d).passed for d in ("point", "interval", "strict")] == [True, True, True]


def test_without_an_interval_every_decision_falls_back_to_the_ratio_and_says_so():
    bare = Evidence("2", 53.4, 60.0, 3.0, "t1")
    assert [_fraction(bare, d).passed for d in ("point", "interval", "strict")] == [False, False, False]
    assert _fraction(bare, "interval").reason.endswith("no interval recorded, so decision 'interval' falls back to the point ratio)")
    assert _fraction(bare, "point").reason == "test mean recall 53.40 < 0.9 x teacher's 60.00 = 54.00 (it is 89.0% of the teacher)"


def test_the_interval_is_read_back_from_the_tags():
    tags = {TAG_MEAN_RECALL: "53.4", TAG_TEACHER_RECALL: "60", TAG_ENCODE_MS: "3", TAG_TEST_SET: "t1",
            TAG_FRACTION_LOW: "0.865", TAG_FRACTION_HIGH: "0.915", TAG_FRACTION_INTERVAL: "95% interval 86.5%-91.5%"}
    evidence = Evidence.from_tags("2", tags)
    assert (evidence.fraction_low, evidence.fraction_high, evidence.fraction_interval) == (0.865, 0.915, "95% interval 86.5%-91.5%")
    assert gate(evidence, None, PromoteConfig()).passed  # the default decision: interval
