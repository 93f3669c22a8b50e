"""The quality gate's statistics: paired comparisons of two models on the same items, and the rule that
turns a difference into a verdict. Pure numpy, seeded, vectorised (the gate's tests simulate 1,000
nights in one call).

Why these tests (docs/evaluation.md, "The gate's statistics"):

- Both models answer the *same* items, so the comparison is paired: the noise that matters is how
  often the two models disagree, not the spread of each accuracy. Treating the two accuracies as
  independent samples would throw that away and need several times the rows for the same power.
- 0/1 items (a GSM8K question, a HumanEval problem): **exact McNemar test**, i.e. a binomial test on
  the discordant pairs (items one model gets right and the other wrong). Exact at any size (164
  HumanEval problems, 40 identity questions), no large-sample approximation, and it never rejects
  more often than its level.
- Continuous items (per-row validation loss, per-row token accuracy): **paired sign-flip
  (randomization) test** of the mean difference. With no true difference, each row's difference is
  as likely to have either sign; flipping signs at random gives the null distribution. Valid for a
  dozen rows (the demo's validation split) where a bootstrap p-value is too optimistic. On 0/1 items
  it is the same test as McNemar's (only discordant pairs can flip).
- The 95% interval shown beside every delta is a **paired percentile bootstrap** over items: it
  describes the size of the difference. The p-value decides; the interval informs.

The rule (``decide``): a metric fails when the regression is larger than its tolerance *and* credible
(one-sided p < ``ALPHA`` = 0.05, H0: the new model is not worse). One-sided because the gate asks one
question, "is it worse?"; an improvement never fails.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

ALPHA = 0.05  # one-sided level of the gate's tests
LEVEL = 0.95  # coverage of the intervals shown
N_RESAMPLES = 4000  # bootstrap resamples and sign flips: p resolution 1/4001, interval ends stable to ~0.002
SEED = 0


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def binomial_upper_tail(k: np.ndarray | int, n: np.ndarray | int) -> np.ndarray:
    """P(X ≥ k) for X ~ Binomial(n, 1/2), elementwise (exact sums of log-binomial terms).

    >>> round(float(binomial_upper_tail(9, 10)) * 1024, 9)  # (10 + 1) / 1024
    11.0
    >>> binomial_upper_tail([0, 3, 4], [0, 3, 3]).round(12).tolist()
    [1.0, 0.125, 0.0]
    """
    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    out = np.zeros(k.shape)
    if not n.size:
        return out
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(n.max()) + 1)))])
    for m in np.unique(n):  # one pmf per distinct number of trials: O(sum of distinct n), not O(n²)
        j = np.arange(m + 1)
        pmf = np.exp(logfact[m] - logfact[j] - logfact[m - j] - m * math.log(2))
        tail = np.concatenate([np.cumsum(pmf[::-1])[::-1], [0.0]])  # tail[j] = P(X >= j), tail[m + 1] = 0
        sel = n == m
        out[sel] = tail[np.clip(k[sel], 0, m + 1)]
    return np.minimum(out, 1.0)


def mcnemar(new: np.ndarray, ref: np.ndarray) -> dict[str, np.ndarray]:
    """Exact one-sided McNemar test of "new is worse than ref" on paired 0/1 items (last axis).

    ``worse``: items ref got right and new got wrong; ``better``: the reverse. With no true change,
    each discordant item is equally likely to be either, so ``p = P(Binomial(worse + better, 1/2) ≥
    worse)``.

    >>> ref = np.array([1] * 10 + [0] * 10)
    >>> new = np.array([0] * 9 + [1] + [0] * 9 + [1])   # 9 regressions, 1 improvement
    >>> r = mcnemar(new, ref)
    >>> int(r["worse"]), int(r["better"]), round(float(r["p"]), 4)
    (9, 1, 0.0107)
    """
    new, ref = np.asarray(new) > 0.5, np.asarray(ref) > 0.5
    worse = (ref & ~new).sum(axis=-1)
    better = (~ref & new).sum(axis=-1)
    return {"worse": worse, "better": better, "p": binomial_upper_tail(worse, worse + better)}


def sign_flip(diff: np.ndarray, *, n_flips: int = N_RESAMPLES, seed: int = SEED, chunk: int = 250) -> np.ndarray:
    """One-sided paired randomization test that the mean of ``diff`` (last axis) is > 0, where a
    positive difference means "worse". Returns the p-value (with the +1 that keeps a Monte Carlo
    test valid), one per leading index.

    >>> rows = np.array([0.3, 0.2, 0.4, 0.25, 0.35, 0.3, 0.2, 0.3])   # every row worse
    >>> float(sign_flip(rows)) < 0.01
    True
    >>> float(sign_flip(rows - rows.mean())) > 0.3   # centred: no evidence
    True
    """
    diff = np.asarray(diff, dtype=np.float64)
    n = diff.shape[-1]
    signs = _rng(seed).choice(np.array([-1.0, 1.0]), size=(n_flips, n))
    observed = diff.mean(axis=-1)
    flat = diff.reshape(-1, n)
    count = np.zeros(flat.shape[0])
    tol = 1e-12 * np.maximum(1.0, np.abs(flat).max(axis=-1))  # ties (e.g. identical items) count against
    for start in range(0, n_flips, chunk):
        flipped = flat @ signs[start : start + chunk].T / n  # (rows, chunk)
        count += (flipped >= observed.reshape(-1)[:, None] - tol[:, None]).sum(axis=1)
    return ((count + 1) / (n_flips + 1)).reshape(observed.shape)


def resample_counts(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """How often each of ``n`` items is drawn in each bootstrap resample: ``(n_resamples, n)``."""
    drawn = _rng(seed).integers(0, n, size=(n_resamples, n))
    offsets = (np.arange(n_resamples) * n)[:, None]
    return np.bincount((drawn + offsets).ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(float)


def paired_bootstrap(
    new: np.ndarray,
    ref: np.ndarray,
    *,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    level: float = LEVEL,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Delta ``f(mean(new)) − f(mean(ref))`` and its percentile interval, resampling *items* (both
    models' values of an item travel together). ``transform`` f: e.g. ``np.exp`` for perplexity
    from per-row losses. Returns ``(delta, low, high)``, one per leading index.

    >>> ref = np.array([1.0, 2.0, 3.0, 4.0])
    >>> delta, low, high = paired_bootstrap(ref + 0.5, ref)
    >>> float(delta), float(low), float(high)   # a constant shift: no uncertainty
    (0.5, 0.5, 0.5)
    """
    f = transform or (lambda x: x)
    new, ref = np.asarray(new, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    n = new.shape[-1]
    counts = resample_counts(n, n_resamples, seed)
    boot = f(new.reshape(-1, n) @ counts.T / n) - f(ref.reshape(-1, n) @ counts.T / n)  # (rows, resamples)
    delta = f(new.mean(axis=-1)) - f(ref.mean(axis=-1))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail], axis=1)
    return delta, low.reshape(delta.shape), high.reshape(delta.shape)


def smallest_p(informative: int) -> float:
    """The smallest one-sided p-value a paired test on ``informative`` items can reach: every item
    that differs (a discordant pair, a row whose loss changed) pointing the same way, ``2**-n``. Both
    tests here are conditional on those items (ties carry no sign), so this bounds McNemar and the
    sign-flip test alike.

    >>> smallest_p(4), smallest_p(5)
    (0.0625, 0.03125)
    """
    return 0.5 ** max(int(informative), 0)


def items_needed(alpha: float = ALPHA) -> int:
    """The fewest differing items with which a paired test can reach ``p < alpha`` (5 at 0.05).

    >>> items_needed(0.05), items_needed(0.01)
    (5, 7)
    """
    return math.floor(math.log2(1 / alpha)) + 1


def decide(worse_by: np.ndarray, p: np.ndarray, tolerance: np.ndarray | float, alpha: float = ALPHA) -> np.ndarray:
    """The gate's rule: fail when the regression (``worse_by`` > 0 means worse) exceeds the
    tolerance *and* is credible (one-sided ``p < alpha``). Elementwise; True = fail.

    >>> decide(np.array([0.12, 0.12, 0.02]), np.array([0.001, 0.2, 0.001]), 0.05).tolist()
    [True, False, False]
    """
    return (np.asarray(worse_by) > tolerance) & (np.asarray(p) < alpha)


def compare(
    new: list[float] | np.ndarray,
    ref: list[float] | np.ndarray,
    *,
    binary: bool,
    higher_is_better: bool,
    tolerance: float,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, object]:
    """One paired comparison, as the gate records it: delta (new − ref, on the metric's scale), its
    95% interval, the one-sided p-value of "new is worse", the test used, and whether it fails.

    >>> ref = [1] * 120 + [0] * 80                       # 60% right
    >>> new = [1] * 90 + [0] * 30 + [0] * 70 + [1] * 10  # 30 regressions, 10 improvements: 50%
    >>> c = compare(new, ref, binary=True, higher_is_better=True, tolerance=0.05)
    >>> round(c["delta"], 3), c["test"], c["p_value"] < 0.01, c["failed"]
    (-0.1, 'exact McNemar', True, True)
    """
    new_a, ref_a = np.asarray(new, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if new_a.shape != ref_a.shape or new_a.ndim != 1 or new_a.size == 0:
        raise ValueError(f"paired items must be two non-empty lists of one length ({new_a.shape} vs {ref_a.shape})")
    delta, low, high = paired_bootstrap(new_a, ref_a, transform=transform)
    if binary:
        result = mcnemar(new_a, ref_a)
        p, test = float(result["p"]), "exact McNemar"
        extra = {"discordant": {"worse": int(result["worse"]), "better": int(result["better"])}}
    else:
        # A positive difference means worse: the test's orientation. A monotone transform (exp)
        # keeps the ordering, so the test runs on the raw items.
        diff = ref_a - new_a if higher_is_better else new_a - ref_a
        p, test, extra = float(sign_flip(diff)), "paired sign-flip", {}
    worse_by = -float(delta) if higher_is_better else float(delta)
    return {
        "delta": float(delta),
        "interval": [float(low), float(high)],
        "p_value": p,
        "test": test,
        "n": int(new_a.size),
        **extra,
        "failed": bool(decide(worse_by, p, tolerance)),
    }
