"""A gate that cannot pass by not looking: the anchor bounds a slow slide (ten simulated nights, each
1.9% worse than the last, fail by the night the cumulative loss passes the tolerance; no change
fails at most 5% of 1,000 nights), underpowered comparisons are inconclusive (and parameters refuse
sizes that can never fail), non-finite items and one-sided metrics fail closed."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.evaluate import EvalParams, quality_gate
from tasks.evaluate.stats import decide, mcnemar, sign_flip

LOSS_ONLY = EvalParams(suites=["validation"], gate_metrics=["validation_loss"])
NIGHTS = 1000


def _slide(nights: int, step: float, n: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Per-row validation losses of the anchor (night 0) and ``nights`` nights after it, each night
    ``step`` worse than the one before on every row, with 0.3% per-row noise."""
    rng = np.random.default_rng(seed)
    anchor = rng.gamma(4.0, 0.3, size=n)
    return [anchor] + [anchor * (1 + step) ** k * (1 + rng.normal(0, 0.003, n)) for k in range(1, nights + 1)]


def _night(tuned, champion, anchor, config=LOSS_ONLY, base_factor=1.5, **ids):
    """One night's gate; the base (the untuned model) is ``base_factor`` times worse than the anchor."""
    items = {"base": {"validation_loss": list(anchor * base_factor)}, "tuned": {"validation_loss": list(tuned)}}
    items["champion"] = {"validation_loss": list(champion)}
    if ids.get("anchor_id"):
        items["anchor"] = {"validation_loss": list(anchor)}
    return quality_gate(items, config, champion_id="night-before", **ids)


def test_ten_nights_each_1_9_percent_worse_fail_by_the_night_the_cumulative_loss_passes_the_tolerance():
    cfg = LOSS_ONLY
    losses = _slide(10, 0.019)
    anchor = losses[0]
    # The nightly gate alone: each night is 1.9% worse than its champion (under the 2% tolerance,
    # however credible), so every night passes and becomes the next champion: the hole.
    assert all(_night(losses[k], losses[k - 1], anchor)["passed"] for k in range(1, 11))

    crossing = next(k for k in range(1, 11) if 1.019**k - 1 > cfg.anchor_loss_tolerance)
    assert crossing == 3  # 5.8% > 5%
    champion, verdicts = anchor, []
    for k in range(1, 11):
        gate = _night(losses[k], champion, anchor, anchor_id="the-anchor")
        verdicts.append(gate)
        if gate["passed"]:
            champion = losses[k]  # a passing night is released: tomorrow's champion
    first_fail = next(k for k, g in enumerate(verdicts, start=1) if not g["passed"])
    assert first_fail <= crossing
    assert all(verdicts[k - 1]["passed"] for k in range(1, first_fail))  # no earlier false stop
    reason = verdicts[first_fail - 1]["reasons"][0]
    assert reason.startswith("validation_loss +") and "vs anchor the-anchor: worse than cumulative tolerance" in reason
    # Once the slide is stopped it stays stopped: the champion no longer moves, the anchor holds.
    assert not any(g["passed"] for g in verdicts[first_fail - 1 :])


def test_no_change_against_the_anchor_fails_at_most_5_percent_of_nights():
    cfg = EvalParams()
    rng = np.random.default_rng(11)
    ref = rng.gamma(4.0, 0.3, size=(NIGHTS, 200))
    new = ref + rng.normal(0.0, 0.15, size=(NIGHTS, 200))
    diff = new - ref
    loss_fails = decide(diff.mean(axis=-1), sign_flip(diff), cfg.anchor_loss_tolerance * ref.mean(axis=-1))
    assert loss_fails.mean() <= 0.05
    outcome = rng.choice(4, size=(NIGHTS, 200), p=[0.375, 0.125, 0.125, 0.375])  # a quarter discordant
    ref_b, new_b = np.isin(outcome, (0, 1)).astype(float), np.isin(outcome, (0, 2)).astype(float)
    acc_fails = decide((ref_b - new_b).mean(axis=-1), mcnemar(new_b, ref_b)["p"], cfg.anchor_accuracy_tolerance)
    assert acc_fails.mean() <= 0.05
    # And through the whole gate (base, champion and anchor all unchanged), a sample of nights.
    cfg = LOSS_ONLY
    fails = 0
    for night in range(40):
        tuned, ref_n = new[night], ref[night]
        fails += not _night(tuned, ref_n, ref_n, cfg, base_factor=1.0, anchor_id="a")["passed"]
    assert fails <= 2


def test_four_rows_cannot_fail_so_a_10x_regression_is_inconclusive_unless_a_person_allows_it():
    items = {"base": {"validation_loss": [1.2, 1.3, 1.1, 1.4]}, "tuned": {"validation_loss": [12.0, 13, 11, 14]}}
    gate = quality_gate(items, LOSS_ONLY)
    assert not gate["passed"]
    assert gate["reasons"] == [
        "validation_loss vs base: inconclusive on n=4 (4 differing): a paired test on so few can never reach "
        "p < 0.05 (smallest p 0.0625); it needs n >= 5 differing items (eval.allow_inconclusive overrides, "
        "recorded in the manifest)"
    ]
    allowed = quality_gate(items, LOSS_ONLY.model_copy(update={"allow_inconclusive": True}))
    assert allowed["passed"] and allowed["inconclusive_allowed"] == ["validation_loss vs base"]
    assert "allowed by eval.allow_inconclusive" in allowed["notes"][0]
    # Four rows, tuned better: still inconclusive (the gate could not have seen a regression).
    better = {"base": items["tuned"], "tuned": items["base"]}
    assert not quality_gate(better, LOSS_ONLY)["passed"]


def test_enough_rows_but_too_few_differing_items_is_inconclusive_only_when_it_could_hide_a_regression():
    cfg = EvalParams(suites=["gsm8k"], gate_metrics=["gsm8k_accuracy"])
    base = [1.0] * 100 + [0.0] * 100
    # 4 of 200 answers changed, all for the worse: -2 points, within the 5-point tolerance: conclusive.
    small = [0.0] * 4 + [1.0] * 96 + [0.0] * 100
    assert quality_gate({"base": {"gsm8k_accuracy": base}, "tuned": {"gsm8k_accuracy": small}}, cfg)["passed"]
    # 8 rows of loss, 3 of them ten times worse: beyond the tolerance, and 2**-3 can never be < 0.05.
    rows = [1.0, 1.1, 1.2, 0.9, 1.3, 1.0, 1.1, 1.2]
    worse = [10.0, 11.0, 12.0] + rows[3:]
    gate = quality_gate({"base": {"validation_loss": rows}, "tuned": {"validation_loss": worse}}, LOSS_ONLY)
    assert not gate["passed"] and "inconclusive on n=8 (3 differing)" in gate["reasons"][0]


def test_parameters_refuse_gated_sizes_that_can_never_reach_significance():
    for field in ("validation_max_rows", "gsm8k_max_rows", "humaneval_max_problems"):
        with pytest.raises(ValidationError, match=f"eval.{field}=4 with .* gated: .* never reach p < 0.05"):
            EvalParams(**{field: 4})
    EvalParams(gsm8k_max_rows=4, gate_metrics=["validation_loss"])  # not gated: any size
    EvalParams(validation_max_rows=5)


def test_non_finite_items_on_any_side_fail_closed_naming_the_model_and_rows():
    tuned = [10.0] * 12
    base = [1.25] * 12
    base[2], base[5] = float("nan"), float("inf")
    gate = quality_gate({"base": {"validation_loss": base}, "tuned": {"validation_loss": tuned}}, LOSS_ONLY)
    assert not gate["passed"]
    assert gate["reasons"][0] == (
        "validation_loss vs base: per-item results not finite (base: rows 2, 5); the comparison fails closed"
    )
    champion = [1.0] * 11 + [float("-inf")]
    bad_tuned = [1.0] * 3 + [float("nan")] + [1.0] * 8
    items = {
        "base": {"validation_loss": [1.0] * 12},
        "champion": {"validation_loss": champion},
        "tuned": {"validation_loss": bad_tuned},
    }
    reasons = quality_gate(items, LOSS_ONLY, champion_id="r7")["reasons"]
    assert "vs base: per-item results not finite (tuned: rows 3)" in reasons[0]
    assert "vs champion r7: per-item results not finite (tuned: rows 3; champion r7: rows 11)" in reasons[1]


def test_a_metric_on_one_side_only_fails():
    items = {
        "base": {"validation_loss": [1.0] * 12},
        "champion": {},
        "tuned": {"validation_loss": [1.0] * 12},
    }
    gate = quality_gate(items, LOSS_ONLY, champion_id="r7")
    assert not gate["passed"]
    assert gate["reasons"] == [
        "validation_loss is missing on the champion r7 side of the comparison (tuned vs champion r7): cannot compare"
    ]
    items = {"base": {"validation_loss": [1.0] * 12}, "tuned": {}}
    assert "missing on the tuned side" in quality_gate(items, LOSS_ONLY)["reasons"][0]


def test_a_validation_split_too_small_to_gate_stops_the_run_before_training():
    from tasks.evaluate import EvalError, check_validation_power

    with pytest.raises(EvalError, match="the validation split has 3 rows but validation_loss gates: .* never fail"):
        check_validation_power(LOSS_ONLY, 3)
    check_validation_power(LOSS_ONLY, 5)
    check_validation_power(LOSS_ONLY.model_copy(update={"allow_inconclusive": True}), 3)  # a person's decision
    check_validation_power(EvalParams(suites=["validation"], gate_metrics=["self_cognition_accuracy"]), 3)
