"""The promotion gate: a pure function from recorded evidence and the ``promote`` params to
named checks with reasons.

The gate reads only what is recorded on a version (its tags), so a promotion days later re-checks
exactly the evidence the register stage wrote. A check that does not apply is ``skipped``
(``passed is None``) and does not block, which is distinct from ``fail``. One
:class:`GateResult` renders both the version tags and the model card's gate section, and is read
back from those tags (:meth:`GateResult.from_tags`), so the card is regenerated from what the
tags say after every check, never from a verdict remembered elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lightclip.config import PromoteConfig
from lightclip.tracking import TAG_PREFIX

# The evidence the gate reads, as version tags (all under the lightclip. prefix).
TAG_MEAN_RECALL = f"{TAG_PREFIX}mean_recall"  # the gate's metric, on the split named by the split tag
TAG_TEACHER_RECALL = f"{TAG_PREFIX}teacher_mean_recall"
# the test set's sampling error on mean recall / teacher's: a paired bootstrap interval
TAG_FRACTION_LOW = f"{TAG_PREFIX}teacher_fraction_low"
TAG_FRACTION_HIGH = f"{TAG_PREFIX}teacher_fraction_high"
TAG_FRACTION_INTERVAL = f"{TAG_PREFIX}teacher_fraction_interval"  # how it was computed, in words
SPEED_TAG_PREFIX = f"{TAG_PREFIX}speed."  # the latency and how it was measured (registry.packaging)
TAG_ENCODE_MS = f"{SPEED_TAG_PREFIX}encode_ms_p50"
#: the runtime the version carries, is served on and was timed on (torch | onnx; absent: torch)
TAG_RUNTIME = f"{SPEED_TAG_PREFIX}runtime"
TAG_TEST_SET = f"{TAG_PREFIX}test_set"
GATE_TAG_PREFIX = f"{TAG_PREFIX}gate."
#: The checks :func:`gate` makes, in the order it makes (and the card lists) them.
CHECK_NAMES: tuple[str, ...] = ("teacher_fraction", "latency", "regression")
_VERDICTS = {"pass": True, "fail": False, "skipped": None}
#: The runtimes' names as the card and the gate's reasons say them.
RUNTIME_NAMES = {"torch": "PyTorch", "onnx": "ONNX Runtime"}


@dataclass(frozen=True)
class Evidence:
    """What the gate reads about one version (recorded as its tags, so a promotion re-checks it)."""

    version: str | None
    mean_recall: float | None
    teacher_mean_recall: float | None
    encode_ms: float | None
    test_set: str | None
    latency_conditions: str | None = None  # how and under what load encode_ms was measured
    fraction_low: float | None = None  # the interval of mean_recall / teacher_mean_recall
    fraction_high: float | None = None
    fraction_interval: str | None = None  # how that interval was computed

    @classmethod
    def from_tags(cls, version: str, tags: Mapping[str, str]) -> "Evidence":
        def number(key: str) -> float | None:
            try:
                return float(tags[key])
            except (KeyError, ValueError):
                return None

        speed = {k[len(SPEED_TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(SPEED_TAG_PREFIX)}
        return cls(version=str(version), mean_recall=number(TAG_MEAN_RECALL), teacher_mean_recall=number(TAG_TEACHER_RECALL),
                   encode_ms=number(TAG_ENCODE_MS), test_set=tags.get(TAG_TEST_SET),
                   latency_conditions=latency_conditions(speed) if "method" in speed else None,
                   fraction_low=number(TAG_FRACTION_LOW), fraction_high=number(TAG_FRACTION_HIGH),
                   fraction_interval=tags.get(TAG_FRACTION_INTERVAL))


def latency_conditions(speed: Mapping[str, Any]) -> str:
    """How a latency was measured, in one line: method, rounds, threads, load, CPUs, contention.

    ``speed`` is the measurement (numbers) or its version tags without the prefix (strings).
    """
    def number(key: str) -> float:
        try:
            return float(speed[key])
        except (KeyError, ValueError):
            return float("nan")

    busy = ", busy" if number("busy") == 1 else ""
    runtime = f"{RUNTIME_NAMES.get(str(speed['runtime']), speed['runtime'])}, " if "runtime" in speed else ""
    return (f"{runtime}{speed.get('method', '?')}, {number('rounds'):.0f} rounds x {number('runs'):.0f} runs, {number('threads'):.0f} thread(s); "
            f"load {number('load_1min'):.2f} on {number('cpus'):.0f} CPUs, contention x{number('contention'):.2f}{busy}")


@dataclass(frozen=True)
class Check:
    """One rule of the gate: ``passed`` is None when it did not apply (and does not block)."""

    name: str
    passed: bool | None
    reason: str

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "fail", None: "skipped"}[self.passed]


@dataclass(frozen=True)
class GateResult:
    alias: str
    checks: tuple[Check, ...]
    checked_at: str | None = None  # set when read back from a version's tags

    @classmethod
    def from_tags(cls, alias: str, tags: Mapping[str, str]) -> "GateResult | None":
        """The result :meth:`tags` recorded on a version (None when it was never checked for ``@alias``).

        The inverse of :meth:`tags`: ``from_tags(a, r.tags(at=t)) == replace(r, checked_at=t)``.
        """
        prefix = gate_tag(alias)
        if prefix not in tags:
            return None
        checks = []
        for name in CHECK_NAMES:
            verdict, _, reason = tags.get(f"{prefix}.{name}", "").partition(": ")
            if verdict in _VERDICTS:
                checks.append(Check(name, _VERDICTS[verdict], reason))
        return cls(alias=alias, checks=tuple(checks), checked_at=tags.get(f"{prefix}.checked_at"))

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.verdict}: {c.reason}" for c in self.checks]

    @property
    def failures(self) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.checks if c.passed is False]

    def tags(self, *, at: str) -> dict[str, str]:
        """The verdict and every reason as version tags, under ``lightclip.gate.<alias>``."""
        prefix = gate_tag(self.alias)
        tags = {prefix: self.verdict, f"{prefix}.checked_at": at, f"{prefix}.reasons": "; ".join(self.failures) or "all checks passed"}
        tags.update({f"{prefix}.{c.name}": f"{c.verdict}: {c.reason}" for c in self.checks})
        return tags

    def markdown(self) -> str:
        """The gate's section of the model card."""
        when = f" (checked {self.checked_at})" if self.checked_at else ""
        return "\n".join([f"## Promotion gate (@{self.alias}): {self.verdict}{when}"] + [f"- {r}" for r in self.reasons]) + "\n"


def gate_tag(alias: str) -> str:
    """The tag holding a version's gate verdict for ``@alias`` (its reasons are ``<tag>.<check>``)."""
    return f"{GATE_TAG_PREFIX}{alias}"


def gate(candidate: Evidence, incumbent: Evidence | None, config: PromoteConfig, alias: str = "staging") -> GateResult:
    """Does ``candidate`` deserve ``@alias``, now held by ``incumbent`` (None: nobody)?"""
    checks: list[Check] = []
    recall, teacher = candidate.mean_recall, candidate.teacher_mean_recall
    if recall is None:
        checks.append(Check("teacher_fraction", False, f"no test mean recall recorded (tag {TAG_MEAN_RECALL})"))
    elif teacher is None:
        checks.append(Check("teacher_fraction", False, f"no teacher mean recall recorded (tag {TAG_TEACHER_RECALL})"))
    else:
        checks.append(teacher_fraction_check(candidate, config))
    if candidate.encode_ms is None:
        checks.append(Check("latency", False, f"no encode latency recorded (tag {TAG_ENCODE_MS})"))
    else:
        ok = candidate.encode_ms <= config.max_encode_ms
        measured = f" ({candidate.latency_conditions})" if candidate.latency_conditions else ""
        checks.append(Check("latency", ok, f"encode p50 {candidate.encode_ms:.2f} ms {'<=' if ok else '>'} {config.max_encode_ms:g} ms{measured}"))
    if incumbent is None or incumbent.version is None:
        checks.append(Check("regression", True, f"no version at @{alias} yet"))
    elif incumbent.version == candidate.version:
        checks.append(Check("regression", True, f"it is the version at @{alias}"))
    elif incumbent.test_set != candidate.test_set or incumbent.test_set is None:
        why = f"@{alias} v{incumbent.version} was evaluated on test set {incumbent.test_set}, this one on {candidate.test_set}"
        if config.require_same_test_set:
            checks.append(Check("regression", False, f"not comparable: {why} (promote.require_same_test_set)"))
        else:
            checks.append(Check("regression", None, f"not comparable: {why}"))
    elif recall is None or incumbent.mean_recall is None:
        checks.append(Check("regression", False, f"no test mean recall recorded on v{candidate.version} or @{alias} v{incumbent.version}"))
    else:
        bound = incumbent.mean_recall - config.max_regression
        ok = recall >= bound
        checks.append(Check("regression", ok,
                            f"test mean recall {recall:.2f} {'>=' if ok else '<'} @{alias} v{incumbent.version}'s "
                            f"{incumbent.mean_recall:.2f} - {config.max_regression:g} = {bound:.2f}"))
    return GateResult(alias=alias, checks=tuple(checks))


def teacher_fraction_check(candidate: Evidence, config: PromoteConfig) -> Check:
    """Is the candidate's mean recall at least ``min_teacher_fraction`` of the teacher's?

    Decided per ``promote.teacher_fraction_decision`` on the recorded bootstrap interval (see
    :class:`~lightclip.config.PromoteConfig`); without one, on the test-set ratio, saying so.
    """
    recall, teacher = float(candidate.mean_recall or 0.0), float(candidate.teacher_mean_recall or 0.0)
    minimum = config.min_teacher_fraction
    bound = minimum * teacher
    ratio = recall / teacher if teacher else float("inf")
    point = (f"test mean recall {recall:.2f} {'>=' if recall >= bound else '<'} {minimum:g} x teacher's {teacher:.2f} = {bound:.2f} "
             f"(it is {ratio:.1%} of the teacher")
    low, high = candidate.fraction_low, candidate.fraction_high
    decision = config.teacher_fraction_decision
    if low is None or high is None:
        fallback = "" if decision == "point" else f"; no interval recorded, so decision {decision!r} falls back to the point ratio"
        return Check("teacher_fraction", recall >= bound, point + fallback + ")")
    interval = candidate.fraction_interval or f"interval {low:.1%}-{high:.1%}"
    if decision == "point":
        return Check("teacher_fraction", recall >= bound, f"{point}; {interval})")
    if decision == "interval":
        passed = high >= minimum
        why = (f"the interval reaches {minimum:.0%}: the test set cannot tell it from {minimum:.0%}" if passed and ratio < minimum
               else f"the interval reaches {minimum:.0%}" if passed else f"the whole interval is below {minimum:.0%}")
    else:  # strict
        passed = low >= minimum
        why = f"its lower end {'>=' if passed else '<'} {minimum:.0%}"
    return Check("teacher_fraction", passed, f"{point}; {interval}; decision {decision}: {why})")

