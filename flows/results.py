"""What a retrain shows a person when it ends: the evaluation's metrics table, a few samples (prompt →
the tuned model's answer, the base's beside it), the quality gate, and the release path or why there is
none. The flow builds the summary (``run_samples`` picks the samples from the evaluation report) and
hands it over in either case: as its return value, or on the ``QualityGateFailed`` it raises when the
gate refuses, so a refused night still shows the numbers that refused it. ``print_results`` is what
``tuneline run`` prints last."""

from __future__ import annotations

import sys
from itertools import chain, zip_longest
from typing import Any, TextIO

SAMPLES = 3  # enough to see what the model says; all of them are in the run's eval-samples artifact
CHARS = 160  # one answer per line on a terminal


def run_samples(report: dict[str, Any], limit: int = SAMPLES) -> list[dict[str, str]]:
    """A few generated answers from an evaluation report (``report.json``), one suite after another
    so that each suite that generated shows: the samples prompts, the identity questions, then GSM8K
    and HumanEval items (those where base and tuned disagree first). Empty when no suite generated
    text (``eval.suites`` of validation only measures loss)."""
    suites: list[list[dict[str, str]]] = []
    s = report.get("samples") or {}
    suites.append(
        [
            {"suite": "samples", "prompt": p, "base": b, "tuned": t}
            for p, b, t in zip(s.get("prompts") or [], s.get("base") or [], s.get("tuned") or [])
        ]
    )
    details = report.get("details") or {}
    identity = details.get("self_cognition") or {}
    suites.append(
        [
            {"suite": "self_cognition", "prompt": b["prompt"], "base": b["answer"], "tuned": t["answer"]}
            for b, t in zip(identity.get("base") or [], identity.get("tuned") or [])
        ]
    )
    for suite, key, item in (("gsm8k", "correct", "question"), ("humaneval", "passed", "task_id")):
        rows = details.get(suite) or {}
        pairs = sorted(zip(rows.get("base") or [], rows.get("tuned") or []), key=lambda bt: bt[0][key] == bt[1][key])
        suites.append(
            [{"suite": suite, "prompt": b[item], "base": b["completion"], "tuned": t["completion"]} for b, t in pairs]
        )
    taken = [row for row in chain.from_iterable(zip_longest(*suites)) if row is not None]
    return [{k: str(v) for k, v in row.items()} for row in taken[:limit]]


def _line(text: str, limit: int = CHARS) -> str:
    """One line: whitespace folded, cut with an ellipsis; an empty answer says so."""
    text = " ".join(str(text).split())
    if not text:
        return "(empty)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(v: Any) -> str:
    """Four decimals in a column of ten; a large value (a random model's perplexity) in fewer digits,
    so that columns never run together."""
    if not isinstance(v, (int, float)):
        return f"{'-':>10}"
    text = f"{v:.4f}"
    return f"{text if len(text) <= 9 else f'{v:.6g}':>10}"


def _delta(d: Any, interval: str) -> str:
    return f"{d:+.4f} {interval}" if isinstance(d, (int, float)) else "-"


def print_table(result: dict[str, Any], out: TextIO) -> None:
    """Base, champion (last release) and tuned side by side; each delta with its 95% interval."""
    rows = result.get("table") or []
    champion = result.get("champion")
    cols = ["base"] + (["champion"] if champion else []) + ["tuned"]
    width = max([len(r["metric"]) for r in rows] + [6]) + 2
    header = "metric".ljust(width) + "".join(f"{c:>10}" for c in cols) + f"  {'Δ vs base [95% CI]':<28}"
    print("\n" + (header + ("  Δ vs champion [95% CI]" if champion else "")).rstrip(), file=out)
    for r in rows:
        line = r["metric"].ljust(width) + "".join(_num(r.get(c)) for c in cols)
        line += f"  {_delta(r.get('delta'), r.get('interval', '')):<28}"
        if champion:
            line += "  " + _delta(r.get("delta_champion"), r.get("interval_champion", ""))
        print(line.rstrip(), file=out)
    if champion:
        print(f"\nchampion: release {champion['release_id']} ({champion.get('how')})", file=out)


def print_samples(result: dict[str, Any], out: TextIO) -> None:
    samples = result.get("samples") or []
    if not samples:
        print("\nsamples: none (no suite that generates text ran: add samples to eval.suites)", file=out)
        return
    print("\nsamples (prompt → tuned answer; the base's below it; all of them: the eval-samples artifact):", file=out)
    for s in samples:
        print(f"  [{s['suite']}] {_line(s['prompt'])}", file=out)
        print(f"    → {_line(s['tuned'])}", file=out)
        print(f"    base: {_line(s['base'])}", file=out)


def print_results(result: dict[str, Any], out: TextIO | None = None) -> None:
    """The end of a run: table, samples, gate, and the release path or why there is none."""
    out = out or sys.stdout  # read now: a test's capture replaces sys.stdout after import
    print_table(result, out)
    print_samples(result, out)
    gate = result["gate"]
    print(f"\nquality gate: {'passed' if gate['passed'] else 'FAILED — ' + '; '.join(gate['reasons'])}", file=out)
    if result.get("release_uri"):
        print(f"release: {result['release_uri']}", file=out)
    else:
        print("release: none — the quality gate refused it (eval.force_release releases anyway)", file=out)
