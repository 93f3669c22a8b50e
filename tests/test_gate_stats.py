"""The gate's decision rule on synthetic per-item results: false alarms on nights with no true change
(at most 5% of 1,000 simulated nights), power against a true 10-point GSM8K drop (at least 80% at 200
rows), the rule itself, the identity floor, the champion in the reasons, and no silent pass."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tasks.evaluate import EvalParams, compare, mcnemar, quality_gate, sign_flip
from tasks.evaluate.stats import binomial_upper_tail, decide

NIGHTS = 1000
DEFAULTS = EvalParams()
# A test at level 5% alone (tolerance 0) fails ~5% of null nights: over 1,000 nights the observed rate
# scatters around that by ±0.014 (2 standard errors), so "holds its level" is checked with that margin.
LEVEL_MARGIN = 0.05 + 2 * (0.05 * 0.95 / NIGHTS) ** 0.5


def _binary_nights(seed: int, n: int, p_ref: float, discordance: float, change: float, nights: int = NIGHTS):
    """Paired 0/1 results of a reference and a new model on ``n`` items, ``nights`` times. The two
    disagree on a share ``discordance`` of the items; the new model's true accuracy is ``p_ref +
    change``. Returns (new, ref), each ``(nights, n)``."""
    worse, better = (discordance - change) / 2, (discordance + change) / 2  # P(ref right, new wrong), reverse
    probs = [p_ref - worse, worse, better, 1 - p_ref - better]  # both right, worse, better, both wrong
    assert min(probs) >= 0, probs
    outcome = np.random.default_rng(seed).choice(4, size=(nights, n), p=probs)
    ref = np.isin(outcome, (0, 1)).astype(float)
    new = np.isin(outcome, (0, 2)).astype(float)
    return new, ref


def _binary_fail_rate(new: np.ndarray, ref: np.ndarray, tolerance: float) -> float:
    """The gate's rule on every night at once: exact McNemar p and the tolerance on the delta."""
    worse_by = (ref - new).mean(axis=-1)
    return float(decide(worse_by, mcnemar(new, ref)["p"], tolerance).mean())


def _loss_nights(seed: int, n: int, relative_change: float, nights: int = NIGHTS):
    """Per-row losses of a reference (gamma, mean 1.2) and a new model: the same rows' losses times
    ``1 + relative_change``, plus per-row noise (sd 0.15: the two models disagree row by row)."""
    rng = np.random.default_rng(seed)
    ref = rng.gamma(4.0, 0.3, size=(nights, n))
    new = ref * (1 + relative_change) + rng.normal(0.0, 0.15, size=(nights, n))
    return new, ref


def _loss_fail_rate(new: np.ndarray, ref: np.ndarray, loss_tolerance: float) -> float:
    diff = new - ref  # positive = worse (lower is better)
    return float(decide(diff.mean(axis=-1), sign_flip(diff), loss_tolerance * ref.mean(axis=-1)).mean())


# ----------------------------------------------------------------------------------------------
# Simulated nights
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, p_ref, discordance",
    [
        (200, 0.5, 0.1),  # GSM8K default size, models that mostly agree
        (200, 0.5, 0.25),
        (200, 0.5, 0.5),  # errors independent: the worst case for a paired test
        (200, 0.8, 0.3),
        (164, 0.3, 0.3),  # all of HumanEval
        (48, 0.9, 0.15),  # the identity set's size, were it tested pairwise
    ],
)
def test_no_true_change_fails_at_most_5_percent_of_nights(n, p_ref, discordance):
    new, ref = _binary_nights(seed=n + int(100 * discordance), n=n, p_ref=p_ref, discordance=discordance, change=0.0)
    assert _binary_fail_rate(new, ref, DEFAULTS.accuracy_tolerance) <= 0.05
    # The exact test alone (tolerance 0) already holds the level; the tolerance only lowers it further.
    assert _binary_fail_rate(new, ref, 0.0) <= LEVEL_MARGIN


@pytest.mark.parametrize("n", [12, 32, 200])  # the demo's validation rows, its preset's cap, the default
def test_no_true_change_in_loss_fails_at_most_5_percent_of_nights(n):
    new, ref = _loss_nights(seed=n, n=n, relative_change=0.0)
    assert _loss_fail_rate(new, ref, DEFAULTS.loss_tolerance) <= 0.05
    assert _loss_fail_rate(new, ref, 0.0) <= LEVEL_MARGIN  # the sign-flip test alone holds its level


def test_a_true_10_point_gsm8k_drop_is_caught_at_least_80_percent_of_nights():
    # 200 rows (the default), the reference right on half of them, the two models disagreeing on a
    # quarter of the questions: the stated assumption (docs/evaluation.md has the table by disagreement).
    new, ref = _binary_nights(seed=7, n=DEFAULTS.gsm8k_max_rows, p_ref=0.5, discordance=0.25, change=-0.10)
    assert abs((ref - new).mean() - 0.10) < 0.005  # the simulation is what it says
    assert _binary_fail_rate(new, ref, DEFAULTS.accuracy_tolerance) >= 0.80
    # Fewer disagreements make a drop easier to see, never harder.
    new, ref = _binary_nights(seed=8, n=DEFAULTS.gsm8k_max_rows, p_ref=0.5, discordance=0.15, change=-0.10)
    assert _binary_fail_rate(new, ref, DEFAULTS.accuracy_tolerance) >= 0.95


def test_a_true_5_percent_loss_increase_is_caught_on_200_rows():
    new, ref = _loss_nights(seed=3, n=200, relative_change=0.05)
    assert _loss_fail_rate(new, ref, DEFAULTS.loss_tolerance) >= 0.95


def test_vectorised_rule_is_the_gate_s_rule():
    """The simulations call the vectorised pieces; the gate calls ``compare`` one night at a time."""
    new, ref = _binary_nights(seed=11, n=200, p_ref=0.5, discordance=0.3, change=-0.08, nights=40)
    vectorised = decide((ref - new).mean(axis=-1), mcnemar(new, ref)["p"], 0.05)
    single = [compare(a, b, binary=True, higher_is_better=True, tolerance=0.05)["failed"] for a, b in zip(new, ref)]
    assert vectorised.tolist() == single and 0 < sum(single) < 40
    new, ref = _loss_nights(seed=12, n=30, relative_change=0.04, nights=40)
    diff = new - ref
    vectorised = decide(diff.mean(axis=-1), sign_flip(diff), 0.02 * ref.mean(axis=-1))
    single = [
        compare(a, b, binary=False, higher_is_better=False, tolerance=0.02 * b.mean())["failed"]
        for a, b in zip(new, ref)
    ]
    assert vectorised.tolist() == single


# ----------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------
def test_exact_binomial_tail_against_direct_sums():
    from math import comb

    for n in (0, 1, 7, 60, 200):
        for k in range(n + 2):
            exact = sum(comb(n, j) for j in range(k, n + 1)) / 2**n
            assert float(binomial_upper_tail(k, n)) == pytest.approx(exact, rel=1e-9, abs=1e-15)


def test_decision_needs_both_a_material_and_a_credible_regression():
    ref = np.array([1.0] * 120 + [0.0] * 80)
    big_credible = np.array([1.0] * 90 + [0.0] * 100 + [1.0] * 10)  # -10 points: 30 worse, 10 better
    c = compare(big_credible, ref, binary=True, higher_is_better=True, tolerance=0.05)
    assert c["failed"] and c["p_value"] < 0.01 and c["discordant"] == {"worse": 30, "better": 10}
    low, high = c["interval"]
    assert c["delta"] == pytest.approx(-0.1) and low < -0.1 < high < 0
    # The same 10-point drop from models that disagree on every question (110 worse, 90 better) is not
    # credible: that many coin tosses land 110:90 too often (p ~ 0.09).
    noisy_ref = np.array([1.0] * 110 + [0.0] * 90)
    c = compare(1.0 - noisy_ref, noisy_ref, binary=True, higher_is_better=True, tolerance=0.05)
    assert not c["failed"] and 0.05 < c["p_value"] < 0.1 and c["delta"] == pytest.approx(-0.1)
    # Credible but within tolerance: 3 worse, 0 better on 2,000 items is no material change.
    tiny = np.ones(2000)
    tiny[:3] = 0
    c = compare(tiny, np.ones(2000), binary=True, higher_is_better=True, tolerance=0.05)
    assert not c["failed"] and c["p_value"] == pytest.approx(1 / 8)
    # An improvement never fails, however large.
    assert not compare(ref, big_credible, binary=True, higher_is_better=True, tolerance=0.0)["failed"]
    # Loss: every row worse by 10% of a loss near 1 -> fails; lower loss -> passes.
    rows = np.linspace(0.8, 1.2, 40)
    assert compare(rows * 1.1, rows, binary=False, higher_is_better=False, tolerance=0.02)["failed"]
    assert not compare(rows * 0.9, rows, binary=False, higher_is_better=False, tolerance=0.02)["failed"]


def test_seeded_results_are_reproducible():
    new, ref = _binary_nights(seed=5, n=100, p_ref=0.5, discordance=0.3, change=-0.05, nights=1)
    one = compare(new[0], ref[0], binary=True, higher_is_better=True, tolerance=0.05)
    two = compare(new[0], ref[0], binary=True, higher_is_better=True, tolerance=0.05)
    assert one == two


# ----------------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------------
def _items(acc: float, n: int = 200, first_wrong: bool = False) -> list[float]:
    right = round(acc * n)
    return [0.0] * (n - right) + [1.0] * right if first_wrong else [1.0] * right + [0.0] * (n - right)


def test_champion_comparison_names_the_champion_and_the_interval():
    cfg = EvalParams(gate_metrics=["gsm8k_accuracy"])
    items = {
        "base": {"gsm8k_accuracy": _items(0.30)},
        "champion": {"gsm8k_accuracy": _items(0.62)},
        "tuned": {"gsm8k_accuracy": _items(0.50)},  # better than the base, 12 points worse than the champion
    }
    gate = quality_gate(items, cfg, champion_id="20260101T000000Z-abc")
    assert not gate["passed"] and gate["champion"] == "20260101T000000Z-abc"
    assert [(c["reference"], c["passed"]) for c in gate["checks"]] == [("base", True), ("champion", False)]
    (reason,) = gate["reasons"]
    pattern = (
        r"gsm8k_accuracy -0\.120 \[-0\.1\d\d, -0\.0\d\d\] vs champion 20260101T000000Z-abc: worse than tolerance 0\.05"
    )
    assert re.match(pattern, reason), reason
    assert "exact McNemar" in reason
    check = gate["checks"][1]
    assert check["reference_id"] == "20260101T000000Z-abc" and check["test"] == "exact McNemar"
    assert set(check) >= {"delta", "interval", "p_value", "tolerance", "reference_value", "tuned", "n", "passed"}
    # Without a champion (a name's first release) only the base is to beat.
    first = quality_gate({k: v for k, v in items.items() if k != "champion"}, cfg)
    assert first["passed"] and first["champion"] is None and [c["reference"] for c in first["checks"]] == ["base"]


def test_nan_on_the_tuned_side_fails():
    items = {"base": {"validation_loss": [1.0, 1.1, 0.9]}, "tuned": {"validation_loss": [1.0, float("nan"), 0.9]}}
    gate = quality_gate(items, EvalParams(gate_metrics=["validation_loss"]))
    assert not gate["passed"] and gate["reasons"] == [
        "validation_loss vs base: per-item results not finite (tuned: rows 1); the comparison fails closed"
    ]


def test_perplexity_is_gated_on_the_loss_items():
    rows = list(np.linspace(1.0, 2.0, 30))
    items = {"base": {"validation_loss": rows}, "tuned": {"validation_loss": [r + 0.2 for r in rows]}}
    gate = quality_gate(items, EvalParams(gate_metrics=["perplexity"]))
    (check,) = gate["checks"]
    assert not gate["passed"] and check["metric"] == "perplexity" and check["test"] == "paired sign-flip"
    assert check["delta"] == pytest.approx(np.exp(1.7) - np.exp(1.5))
    assert gate["reasons"][0].startswith("perplexity +0.") and "2% of 4.48" in gate["reasons"][0]


def test_identity_is_gated_by_an_absolute_floor_not_a_paired_test():
    cfg = EvalParams(gate_metrics=["self_cognition_accuracy"])
    base = {"self_cognition_accuracy": _items(0.0, 48)}
    ok = quality_gate({"base": base, "tuned": {"self_cognition_accuracy": _items(44 / 48, 48)}}, cfg)
    assert ok["passed"] and ok["checks"][0] | {"tuned": 0} == {
        "metric": "self_cognition_accuracy",
        "reference": "floor",
        "rule": "floor",
        "tuned": 0,
        "floor": 0.9,
        "n": 48,
        "passed": True,
    }
    low = quality_gate({"base": base, "tuned": {"self_cognition_accuracy": _items(40 / 48, 48)}}, cfg)
    assert not low["passed"]
    assert low["reasons"] == ["self_cognition_accuracy 0.833 < floor 0.9 on 48 held-out identity questions"]
    # A champion that knows its name better does not fail a night above the floor: no paired test.
    champion = {"self_cognition_accuracy": _items(1.0, 48)}
    tuned = {"self_cognition_accuracy": _items(44 / 48, 48, first_wrong=True)}
    assert quality_gate({"base": base, "champion": champion, "tuned": tuned}, cfg, champion_id="R1")["passed"]
    # The floor is a parameter, and applies only when a model name is set.
    assert quality_gate({"base": base, "tuned": tuned}, EvalParams(**{**cfg.model_dump(), "identity_floor": 0.95}))[
        "reasons"
    ]
    unnamed = quality_gate({"base": base, "tuned": {"self_cognition_accuracy": _items(0.0, 48)}}, cfg, named=False)
    assert not unnamed["passed"] and "no gate metric ran" in unnamed["reasons"][0]
    assert unnamed["notes"] == ["self_cognition_accuracy not gated: no model name is set"]


def test_no_silent_pass_when_no_gate_metric_ran():
    samples_only = EvalParams(suites=["samples"])
    gate = quality_gate({"base": {}, "tuned": {}}, samples_only)
    assert not gate["passed"] and gate["checks"] == [] and not gate["ungated"]
    assert gate["reasons"] == [
        "no gate metric ran (suites samples); set eval.gate_metrics: [] to release without a gate"
    ]
    # A gating metric whose suite did not run is no check either.
    gate = quality_gate({"base": {"token_accuracy": [0.5]}, "tuned": {"token_accuracy": [0.5]}}, DEFAULTS)
    assert not gate["passed"] and "no gate metric ran" in gate["reasons"][0]
    # On purpose: gate_metrics=[] passes, marked ungated (the release manifest records it).
    ungated = quality_gate({"base": {}, "tuned": {}}, EvalParams(suites=["samples"], gate_metrics=[]))
    assert ungated["passed"] and ungated["ungated"] is True and ungated["reasons"] == []
    assert ungated["notes"] == ["eval.gate_metrics is []: released without a gate, on purpose"]
