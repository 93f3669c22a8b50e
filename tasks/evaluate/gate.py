"""The quality gate: does the tuned model keep up with the base on every gating metric?"""

from __future__ import annotations

import math
from typing import Any

from tasks.evaluate.params import LOWER_IS_BETTER, EvalParams


def quality_gate(base: dict[str, float], tuned: dict[str, float], config: EvalParams) -> dict[str, Any]:
    """Check every gating metric that both models have. Lower-is-better metrics (loss, perplexity):
    relative tolerance; accuracies: absolute. A NaN on the tuned side fails. Returns
    ``{"passed", "reasons", "checks"}``.

    >>> cfg = EvalParams()
    >>> quality_gate({"validation_loss": 1.0}, {"validation_loss": 1.01}, cfg)["passed"]
    True
    >>> quality_gate({"gsm8k_accuracy": 0.35}, {"gsm8k_accuracy": 0.31}, cfg)["reasons"]
    ['gsm8k_accuracy 0.31 < base 0.35 − 0.01']
    """
    checks, reasons = [], []
    for metric in config.gate_metrics:
        if metric not in base or metric not in tuned:
            continue  # the suite did not run
        b, t = float(base[metric]), float(tuned[metric])
        if metric in LOWER_IS_BETTER:
            limit = b * (1 + config.loss_tolerance)
            ok = t <= limit + 1e-12
            rule = f"{metric} {t:.4g} > base {b:.4g} × (1 + {config.loss_tolerance:g})"
        else:
            limit = b - config.accuracy_tolerance
            ok = t >= limit - 1e-12
            rule = f"{metric} {t:.4g} < base {b:.4g} − {config.accuracy_tolerance:g}"
        ok = ok and not math.isnan(t)
        checks.append({"metric": metric, "base": b, "tuned": t, "limit": limit, "passed": ok})
        if not ok:
            reasons.append(rule)
    return {"passed": not reasons, "reasons": reasons, "checks": checks}
