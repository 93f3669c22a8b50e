"""The quality gate: is the tuned model credibly worse than the base, or than the champion (the release
its name's ``LATEST`` names), on a gating metric? And does it know who it is?

Every metric of the tuned model is compared item by item with each reference (``compare_models``:
delta, 95% interval, one-sided p-value; the tests are in ``stats.py``). The gate (``quality_gate``)
then applies, per gating metric:

- paired metrics (loss, perplexity, accuracies): fail when the regression exceeds the tolerance *and*
  is credible (one-sided p < 0.05), against the base and against the champion;
- ``self_cognition_accuracy``: an absolute floor (``identity_floor``) when a model name is set. The
  base never knows the name and ~50 questions give a paired test no power, so a floor it is;
- no gating metric ran: fail (a gate that checked nothing must not pass), unless ``gate_metrics`` is
  ``[]`` on purpose: pass, marked ``ungated``.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import numpy as np

from tasks.evaluate.params import BINARY_METRICS, LOWER_IS_BETTER, EvalParams, GateMetric
from tasks.evaluate.stats import ALPHA, compare

METRICS: tuple[str, ...] = get_args(GateMetric)  # the table's order
_ITEMS_OF = {"perplexity": "validation_loss"}  # perplexity is exp(mean loss): tested on the loss items


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(np.minimum(x, 50.0))  # as metrics_from_items caps it


def _num(x: float) -> str:
    return f"{x:+.3f}" if abs(x) < 100 else f"{x:+.4g}"


def reference_name(label: str, champion_id: str | None) -> str:
    """How a reason names the reference: ``base`` or ``champion <release id>``."""
    return f"champion {champion_id}" if label == "champion" else label


def compare_models(
    items: dict[str, dict[str, list[float]]], config: EvalParams, champion_id: str | None = None
) -> list[dict[str, Any]]:
    """The tuned model against each reference (``base``, and ``champion`` when its items are there) on
    every metric both have: the reference's and the tuned value, delta (tuned − reference), its 95%
    interval, the one-sided p-value of "tuned is worse", the test, the tolerance, and ``failed`` (the
    decision rule, whether or not the metric gates)."""
    tuned = items["tuned"]
    out = []
    for label in ("base", "champion"):
        ref = items.get(label)
        if ref is None:
            continue
        for metric in METRICS:
            source = _ITEMS_OF.get(metric, metric)
            if source not in tuned or source not in ref:
                continue
            new_a, ref_a = np.asarray(tuned[source], float), np.asarray(ref[source], float)
            transform = _exp if metric == "perplexity" else None
            ref_value = float((transform or (lambda x: x))(ref_a.mean()))
            new_value = float((transform or (lambda x: x))(new_a.mean()))
            lower = metric in LOWER_IS_BETTER
            tolerance = config.loss_tolerance * abs(ref_value) if lower else config.accuracy_tolerance
            row: dict[str, Any] = {
                "metric": metric,
                "reference": label,
                "reference_id": champion_id if label == "champion" else None,
                "reference_value": ref_value,
                "tuned": new_value,
                "tolerance": tolerance,
            }
            if len(new_a) != len(ref_a):
                raise ValueError(f"{metric}: {len(new_a)} tuned items but {len(ref_a)} {label} items")
            if not np.isfinite(new_a).all() or not math.isfinite(new_value):
                row.update(delta=float("nan"), interval=[float("nan")] * 2, p_value=0.0, test="not finite")
                row.update(n=len(new_a), failed=True)
            elif not np.isfinite(ref_a).all():
                row.update(delta=float("nan"), interval=[float("nan")] * 2, p_value=1.0, test="reference not finite")
                row.update(n=len(new_a), failed=False)
            else:
                binary = metric in BINARY_METRICS
                row.update(
                    compare(
                        new_a,
                        ref_a,
                        binary=binary,
                        higher_is_better=not lower,
                        tolerance=tolerance,
                        transform=transform,
                    )
                )
            out.append(row)
    return out


def _reason(c: dict[str, Any], config: EvalParams) -> str:
    ref = reference_name(c["reference"], c["reference_id"])
    if c["test"] == "not finite":
        return f"{c['metric']} is {c['tuned']} on the tuned model (vs {ref}): not finite"
    low, high = c["interval"]
    tolerance = f"{c['tolerance']:.3g}"
    if c["metric"] in LOWER_IS_BETTER:
        tolerance += f" ({config.loss_tolerance * 100:g}% of {c['reference_value']:.4g})"
    return (
        f"{c['metric']} {_num(c['delta'])} [{_num(low)}, {_num(high)}] vs {ref}: worse than tolerance {tolerance} "
        f"(one-sided p={c['p_value']:.2g}, {c['test']})"
    )


def quality_gate(
    items: dict[str, dict[str, list[float]]],
    config: EvalParams,
    champion_id: str | None = None,
    named: bool = True,
    comparisons: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The verdict on the tuned model: ``{"passed", "reasons", "checks", "ungated", "alpha", "champion",
    "notes"}``. ``items``: per-item results per model (``base``, ``tuned``, optionally ``champion``);
    ``named``: a model name is set (the identity floor applies).

    >>> cfg = EvalParams(gate_metrics=["gsm8k_accuracy"])
    >>> base = {"gsm8k_accuracy": [1.0] * 120 + [0.0] * 80}
    >>> tuned = {"gsm8k_accuracy": [1.0] * 90 + [0.0] * 100 + [1.0] * 10}   # 60% -> 50%
    >>> g = quality_gate({"base": base, "tuned": tuned}, cfg)
    >>> g["passed"], g["reasons"][0].split(" (")[0]
    (False, 'gsm8k_accuracy -0.100 [-0.160, -0.040] vs base: worse than tolerance 0.05')
    >>> print(quality_gate({"base": {}, "tuned": {}}, EvalParams(suites=["samples"]))["reasons"][0])
    no gate metric ran (suites samples); set eval.gate_metrics: [] to release without a gate
    """
    comparisons = compare_models(items, config, champion_id) if comparisons is None else comparisons
    gate: dict[str, Any] = {"passed": True, "reasons": [], "checks": [], "ungated": False, "alpha": ALPHA}
    gate.update(champion=champion_id, notes=[])
    if not config.gate_metrics:
        gate["ungated"] = True
        gate["notes"].append("eval.gate_metrics is []: released without a gate, on purpose")
        return gate
    tuned = items["tuned"]
    for metric in config.gate_metrics:
        if _ITEMS_OF.get(metric, metric) not in tuned:
            continue  # its suite did not run
        if metric == "self_cognition_accuracy":
            if not named:
                gate["notes"].append("self_cognition_accuracy not gated: no model name is set")
                continue
            values = tuned[metric]
            value = sum(values) / len(values) if values else float("nan")
            ok = value >= config.identity_floor - 1e-12  # NaN fails
            gate["checks"].append(
                {"metric": metric, "reference": "floor", "rule": "floor", "tuned": value}
                | {"floor": config.identity_floor, "n": len(values), "passed": ok}
            )
            if not ok:
                floor = f"floor {config.identity_floor:g}"
                gate["reasons"].append(f"{metric} {value:.3f} < {floor} on {len(values)} held-out identity questions")
            continue
        for c in comparisons:
            if c["metric"] == metric:
                gate["checks"].append({**c, "rule": "paired", "passed": not c["failed"]})
                if c["failed"]:
                    gate["reasons"].append(_reason(c, config))
    if not gate["checks"]:
        suites = ", ".join(config.suites)
        gate["reasons"].append(
            f"no gate metric ran (suites {suites}); set eval.gate_metrics: [] to release without a gate"
        )
    gate["passed"] = not gate["reasons"]
    return gate
