"""A gate's decision: a GenEval summary against the policy (gate_config.Thresholds), and the words a
rejection is reported in.

Every check is recorded in the verdict with what it compared, so a rejection can be told from the
record alone (`deco gate run`, `deco pipeline run` and `deco pipeline status` all do):

    {"check": "min_overall", "metric": "overall", "value": 0.212, "threshold": 0.4, "passed": false}
    {"check": "max_task_regression.counting", "metric": "counting", "value": 0.2, "threshold": 0.1,
     "passed": false, "baseline": {"stage": "t2i_256", "step": 200000, "value": 0.5}}

For a regression check, value is the drop from the baseline's score (before - after).
"""
from __future__ import annotations

import logging

from deco.data.errors import ExpectedError

log = logging.getLogger(__name__)

EPSILON = 1e-12  # a drop equal to the allowed one passes, whatever the float rounding


class GateRejected(ExpectedError):
    """A checkpoint was evaluated (or found unevaluable) and rejected: the message is its one line."""

    exit_code = 3


def decide(summary: dict, thresholds, baseline: dict | None, prompts_digest: str) -> tuple[bool, list[str], list[dict]]:
    """(passed, reasons for failing, every check made) of a GenEval summary against the policy.

    `baseline` is a promoted record (gate.promote): the stage's own last promoted checkpoint, or
    the promoted checkpoint of the stage this one started from. Its scores count only when they
    were measured on the same prompt set."""
    tasks = {tag: t["accuracy"] for tag, t in summary["tasks"].items()}
    overall = summary["overall"]
    checks = [_minimum("min_overall", "overall", overall, thresholds.min_overall)]
    checks += [_minimum(f"min_task.{tag}", tag, tasks.get(tag), minimum)
               for tag, minimum in sorted(thresholds.min_task.items())]
    if baseline is not None and baseline.get("prompts_digest") == prompts_digest:
        where = {"stage": baseline.get("stage"), "step": baseline["step"]}
        if thresholds.max_regression is not None:
            checks.append(_regression("max_regression", "overall", baseline["overall"], overall,
                                      thresholds.max_regression, where))
        if thresholds.max_task_regression is not None:
            for tag, before in sorted(baseline["tasks"].items()):
                if tag in tasks:
                    before = before["accuracy"] if isinstance(before, dict) else before
                    checks.append(_regression(f"max_task_regression.{tag}", tag, before, tasks[tag],
                                              thresholds.max_task_regression, where))
    elif baseline is not None:
        log.warning("promoted step %s was scored on another prompt set: regression not checked", baseline["step"])
    reasons = [f"{c['check']}: {check_text(c)}" for c in checks if not c["passed"]]
    return not reasons, reasons, checks


def _minimum(name: str, metric: str, value: float | None, threshold: float) -> dict:
    return {"check": name, "metric": metric, "value": value, "threshold": threshold,
            "passed": value is not None and value >= threshold}


def _regression(name: str, metric: str, before: float, after: float, threshold: float, where: dict) -> dict:
    drop = before - after
    return {"check": name, "metric": metric, "value": round(drop, 6), "threshold": threshold,
            "passed": drop <= threshold + EPSILON, "baseline": {**where, "value": before}}


def _pair(value: float, threshold: float) -> tuple[str, str]:
    """Both numbers with 3 decimals, or more where 3 would print them equal (0.39996 < 0.4)."""
    for digits in (3, 4, 5, 6):
        a, b = f"{value:.{digits}f}", f"{threshold:.{digits}f}"
        if a != b:
            break
    return a, b


def check_text(check: dict) -> str:
    """A check in words, from its recorded fields: `overall 0.212 < 0.400`,
    `counting dropped 0.300 > 0.100 (0.800 -> 0.500 vs t2i_256 step 200000)`."""
    metric, value, threshold, passed = check["metric"], check["value"], check["threshold"], check["passed"]
    if value is None:
        return f"no {metric} images scored"
    shown, limit = _pair(value, threshold)
    base = check.get("baseline")
    if base is None:
        return f"{metric} {shown} {'>=' if passed else '<'} {limit}"
    where = " ".join(str(part) for part in (base.get("stage"), "step", base["step"]) if part)
    return (f"{metric} dropped {shown} {'<=' if passed else '>'} {limit} "
            f"({base['value']:.3f} -> {base['value'] - value:.3f} vs {where})")


def failed_text(verdict: dict) -> str:
    """Every failed check of a verdict, `CHECK: VALUE < THRESHOLD; ...` (or its reasons when it
    records no checks: a checkpoint that could not be evaluated)."""
    failed = [c for c in verdict.get("checks") or [] if not c["passed"]]
    return "; ".join(f"{c['check']}: {check_text(c)}" for c in failed) or "; ".join(verdict.get("reasons") or [])


def rejection_line(verdict: dict) -> str:
    """What a rejected checkpoint failed, in one line: `checkpoint URI failed CHECK: VALUE < THRESHOLD
    (report URI)`, or why it could not be evaluated."""
    uri = verdict["checkpoint"]["uri"]
    if verdict.get("error"):
        return f"checkpoint {uri} could not be evaluated: {verdict['error']}"
    report = verdict.get("report") or {}
    where = report.get("html") or report.get("summary")
    return f"checkpoint {uri} failed {failed_text(verdict)}" + (f" (report {where})" if where else "")


def short_rejection(verdict: dict) -> str:
    """The rejection without URIs, for a status table: `step 240 failed min_overall: overall 0.212 < 0.400`."""
    step = verdict["checkpoint"]["step"]
    return f"step {step} " + ("unevaluable" if verdict.get("error") else f"failed {failed_text(verdict)}")
