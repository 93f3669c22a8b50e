"""The quality gate: is the tuned model credibly worse than the base, or than the champion (the release
its name's ``LATEST`` names), on a gating metric? And does it know who it is?

Every metric of the tuned model is compared item by item with each reference (``compare_models``:
delta, 95% interval, one-sided p-value; the tests are in ``stats.py``). The gate (``quality_gate``)
then applies, per gating metric:

- paired metrics (loss, perplexity, accuracies): fail when the regression exceeds the tolerance *and*
  is credible (one-sided p < 0.05), against the base and against the champion; against the *anchor*
  (a release a person pinned, else the first release) with the cumulative tolerances
  (``anchor_loss_tolerance``, ``anchor_accuracy_tolerance``), so nights each a little worse than the
  last cannot slide without bound;
- a comparison that cannot look fails: *inconclusive* when too few items differ for the test ever to
  reach p < 0.05 (unless ``allow_inconclusive``, which the gate and so the manifest record), a
  non-finite item on either side (naming the model and rows), a metric on one side only;
- ``self_cognition_accuracy``: an absolute floor (``identity_floor``) when a model name is set. The
  base never knows the name and ~50 questions give a paired test no power, so a floor it is;
- no gating metric ran: fail (a gate that checked nothing must not pass), unless ``gate_metrics`` is
  ``[]`` on purpose: pass, marked ``ungated``.
"""

from __future__ import annotations

from typing import Any, get_args

import numpy as np

from tasks.evaluate.params import (
    BINARY_METRICS,
    LOWER_IS_BETTER,
    MIN_GATED_ITEMS,
    SIZE_OF,
    EvalError,
    EvalParams,
    GateMetric,
)
from tasks.evaluate.stats import ALPHA, compare, items_needed, smallest_p

METRICS: tuple[str, ...] = get_args(GateMetric)  # the table's order
_ITEMS_OF = {"perplexity": "validation_loss"}  # perplexity is exp(mean loss): tested on the loss items


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(np.minimum(x, 50.0))  # as metrics_from_items caps it


def _num(x: float) -> str:
    return f"{x:+.3f}" if abs(x) < 100 else f"{x:+.4g}"


REFERENCES = ("base", "champion", "anchor")
_SHOWN_ROWS = 8  # row numbers named in a reason; the rest are counted


def reference_name(label: str, champion_id: str | None) -> str:
    """How a reason names the reference: ``base``, ``champion <release id>`` or ``anchor <release id>``."""
    return f"{label} {champion_id}" if label in ("champion", "anchor") and champion_id else label


def _rows(bad: np.ndarray) -> str:
    where = np.flatnonzero(bad)
    shown = ", ".join(str(int(i)) for i in where[:_SHOWN_ROWS])
    return f"rows {shown}" + (f" and {len(where) - _SHOWN_ROWS} more" if len(where) > _SHOWN_ROWS else "")


def _tolerances(config: EvalParams, label: str) -> tuple[float, float]:
    """(relative loss tolerance, absolute accuracy tolerance) against one reference: the anchor gets
    the cumulative ones (the drift a night may have accumulated since the anchor), the others the nightly."""
    if label == "anchor":
        return config.anchor_loss_tolerance, config.anchor_accuracy_tolerance
    return config.loss_tolerance, config.accuracy_tolerance


def _closed(row: dict[str, Any], test: str, n: int, **extra: Any) -> dict[str, Any]:
    """A comparison that could not be made: it fails (a gate never passes by not looking)."""
    closed = {"delta": float("nan"), "interval": [float("nan")] * 2, "p_value": float("nan"), "test": test}
    return row | closed | {"n": n, "failed": True, **extra}


def compare_models(
    items: dict[str, dict[str, list[float]]],
    config: EvalParams,
    champion_id: str | None = None,
    anchor_id: str | None = None,
) -> list[dict[str, Any]]:
    """The tuned model against each reference (``base``; ``champion`` and ``anchor`` when their items
    are there) on every metric either has: the reference's and the tuned value, delta (tuned −
    reference), its 95% interval, the one-sided p-value of "tuned is worse", the test, the tolerance,
    and ``failed`` (the decision rule, whether or not the metric gates).

    It fails closed: a metric on one side only (``test: "missing"``), a non-finite item on either side
    (``"not finite"``, with the model and rows in ``bad``), and a comparison too small to ever reach
    significance (``inconclusive``: fewer differing items than ``stats.items_needed``, when that could
    hide a regression beyond the tolerance) all set ``failed``."""
    tuned = items["tuned"]
    ids = {"champion": champion_id, "anchor": anchor_id}
    needed = items_needed(ALPHA)
    out = []
    for label in REFERENCES:
        ref = items.get(label)
        if ref is None:
            continue
        loss_tol, acc_tol = _tolerances(config, label)
        for metric in METRICS:
            source = _ITEMS_OF.get(metric, metric)
            if source not in tuned and source not in ref:
                continue
            row: dict[str, Any] = {"metric": metric, "reference": label, "reference_id": ids.get(label)}
            lower = metric in LOWER_IS_BETTER
            if source not in tuned or source not in ref:
                missing = "tuned" if source not in tuned else reference_name(label, ids.get(label))
                out.append(
                    _closed(
                        row | {"reference_value": None, "tuned": None, "tolerance": None}, "missing", 0, missing=missing
                    )
                )
                continue
            new_a, ref_a = np.asarray(tuned[source], float), np.asarray(ref[source], float)
            if len(new_a) != len(ref_a):
                raise ValueError(f"{metric}: {len(new_a)} tuned items but {len(ref_a)} {label} items")
            transform = _exp if metric == "perplexity" else None
            ref_value = float((transform or (lambda x: x))(ref_a.mean())) if len(ref_a) else float("nan")
            new_value = float((transform or (lambda x: x))(new_a.mean())) if len(new_a) else float("nan")
            tolerance = loss_tol * abs(ref_value) if lower else acc_tol
            row.update(reference_value=ref_value, tuned=new_value, tolerance=tolerance)
            bad = {
                name: _rows(~np.isfinite(a))
                for name, a in (("tuned", new_a), (reference_name(label, ids.get(label)), ref_a))
                if not np.isfinite(a).all()
            }
            if bad or not len(new_a):
                out.append(_closed(row, "not finite" if bad else "no items", len(new_a), bad=bad))
                continue
            row.update(
                compare(
                    new_a,
                    ref_a,
                    binary=metric in BINARY_METRICS,
                    higher_is_better=not lower,
                    tolerance=tolerance,
                    transform=transform,
                )
            )
            informative = int(np.count_nonzero(new_a != ref_a))
            worse_by = row["delta"] if lower else -row["delta"]
            # Underpowered: the test could never say "credibly worse", so a regression beyond the
            # tolerance would pass unseen. Fewer rows than needed is inconclusive whatever the delta.
            if smallest_p(informative) >= ALPHA and (len(new_a) < needed or worse_by > tolerance):
                row.update(inconclusive=True, informative=informative, needed=needed, failed=True)
            out.append(row)
    return out


def _reason(c: dict[str, Any], config: EvalParams) -> str:
    ref = reference_name(c["reference"], c["reference_id"])
    if c["test"] == "missing":
        return f"{c['metric']} is missing on the {c['missing']} side of the comparison (tuned vs {ref}): cannot compare"
    if c["test"] in ("not finite", "no items"):
        where = "; ".join(f"{who}: {rows}" for who, rows in c.get("bad", {}).items()) or "no items"
        return f"{c['metric']} vs {ref}: per-item results not finite ({where}); the comparison fails closed"
    if c.get("inconclusive"):
        return (
            f"{c['metric']} vs {ref}: inconclusive on n={c['n']} ({c['informative']} differing): a paired test "
            f"on so few can never reach p < {ALPHA:g} (smallest p {smallest_p(c['informative']):.3g}); it needs "
            f"n >= {c['needed']} differing items (eval.allow_inconclusive overrides, recorded in the manifest)"
        )
    low, high = c["interval"]
    tolerance = f"{c['tolerance']:.3g}"
    if c["metric"] in LOWER_IS_BETTER:
        share = _tolerances(config, c["reference"])[0]
        tolerance += f" ({share * 100:g}% of {c['reference_value']:.4g})"
    kind = "cumulative tolerance" if c["reference"] == "anchor" else "tolerance"
    return (
        f"{c['metric']} {_num(c['delta'])} [{_num(low)}, {_num(high)}] vs {ref}: worse than {kind} {tolerance} "
        f"(one-sided p={c['p_value']:.2g}, {c['test']})"
    )


def check_validation_power(config: EvalParams, validation_rows: int | None) -> None:
    """Before training: ``EvalError`` when the data stage's validation split is too small for the
    gated validation metrics ever to fail (the gate would only say "inconclusive" hours later),
    unless a person allowed that (``allow_inconclusive``) or releases regardless (``force_release``)."""
    gated = [m for m in config.gate_metrics if SIZE_OF.get(m) == "validation_max_rows"]
    if "validation" not in config.suites or not gated or validation_rows is None:
        return
    if config.allow_inconclusive or config.force_release:
        return
    rows = min(validation_rows, config.validation_max_rows)
    if rows < MIN_GATED_ITEMS:
        raise EvalError(
            f"the validation split has {rows} rows but {', '.join(gated)} gates: a paired test on fewer than "
            f"{MIN_GATED_ITEMS} can never fail, so the gate would be inconclusive; give the data more "
            "rows (data.validation_ratio, data.validation_max_rows), or set eval.allow_inconclusive (recorded in the "
            "manifest)"
        )


def quality_gate(
    items: dict[str, dict[str, list[float]]],
    config: EvalParams,
    champion_id: str | None = None,
    named: bool = True,
    comparisons: list[dict[str, Any]] | None = None,
    anchor_id: str | None = None,
) -> dict[str, Any]:
    """The verdict on the tuned model: ``{"passed", "reasons", "checks", "ungated", "alpha", "champion",
    "anchor", "inconclusive_allowed", "notes"}``. ``items``: per-item results per model (``base``,
    ``tuned``, optionally ``champion`` and ``anchor``); ``named``: a model name is set (the identity
    floor applies). An inconclusive comparison fails unless ``allow_inconclusive`` is on: then it is
    listed in ``inconclusive_allowed`` (the manifest keeps the gate) and noted.

    >>> cfg = EvalParams(gate_metrics=["gsm8k_accuracy"])
    >>> base = {"gsm8k_accuracy": [1.0] * 120 + [0.0] * 80}
    >>> tuned = {"gsm8k_accuracy": [1.0] * 90 + [0.0] * 100 + [1.0] * 10}   # 60% -> 50%
    >>> g = quality_gate({"base": base, "tuned": tuned}, cfg)
    >>> g["passed"], g["reasons"][0].split(" (")[0]
    (False, 'gsm8k_accuracy -0.100 [-0.160, -0.040] vs base: worse than tolerance 0.05')
    >>> print(quality_gate({"base": {}, "tuned": {}}, EvalParams(suites=["samples"]))["reasons"][0])
    no gate metric ran (suites samples); set eval.gate_metrics: [] to release without a gate
    """
    if comparisons is None:
        comparisons = compare_models(items, config, champion_id, anchor_id)
    gate: dict[str, Any] = {"passed": True, "reasons": [], "checks": [], "ungated": False, "alpha": ALPHA}
    gate.update(champion=champion_id, anchor=anchor_id, inconclusive_allowed=[], notes=[])
    if not config.gate_metrics:
        gate["ungated"] = True
        gate["notes"].append("eval.gate_metrics is []: released without a gate, on purpose")
        return gate
    tuned = items["tuned"]
    for metric in config.gate_metrics:
        source = _ITEMS_OF.get(metric, metric)
        if source not in tuned and not any(source in items.get(r, {}) for r in REFERENCES):
            continue  # its suite did not run (on one side only: compare_models fails it as missing)
        if metric == "self_cognition_accuracy":
            if not named:
                gate["notes"].append("self_cognition_accuracy not gated: no model name is set")
                continue
            values = tuned.get(metric, [])
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
            if c["metric"] != metric:
                continue
            allowed = bool(c.get("inconclusive")) and config.allow_inconclusive
            gate["checks"].append({**c, "rule": "paired", "passed": not c["failed"] or allowed})
            if allowed:
                gate["inconclusive_allowed"].append(f"{metric} vs {reference_name(c['reference'], c['reference_id'])}")
                gate["notes"].append(
                    _reason(c, config).split(" (eval.allow")[0] + ": allowed by eval.allow_inconclusive"
                )
            elif c["failed"]:
                gate["reasons"].append(_reason(c, config))
    if not gate["checks"]:
        suites = ", ".join(config.suites)
        gate["reasons"].append(
            f"no gate metric ran (suites {suites}); set eval.gate_metrics: [] to release without a gate"
        )
    gate["passed"] = not gate["reasons"]
    return gate
