"""The report rendered for people: the metrics table artifact (base / champion / tuned, each delta with
its 95% interval) and the side-by-side markdown."""

from __future__ import annotations

import math
from typing import Any


def _round(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def _interval(c: dict[str, Any] | None) -> str:
    if c is None or any(math.isnan(v) for v in c["interval"]):
        return "-"
    low, high = c["interval"]
    return f"[{low:+.4g}, {high:+.4g}]"


def metrics_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the Prefect table artifact: metric, base, (champion,) tuned, the delta against each
    reference with its 95% interval, and the gate's verdict on the metric (FAIL when any check of it
    failed, ``-`` when it does not gate).

    >>> report = {"metrics": {"base": {"m": 0.5}, "tuned": {"m": 0.4}}, "gate": {"checks": []},
    ...           "comparisons": [{"metric": "m", "reference": "base", "interval": [-0.15, -0.05]}]}
    >>> metrics_table(report)
    [{'metric': 'm', 'base': 0.5, 'tuned': 0.4, 'delta': -0.1, 'interval': '[-0.15, -0.05]', 'gate': '-'}]
    """
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    champion = report["metrics"].get("champion")
    comparisons = {(c["metric"], c["reference"]): c for c in report.get("comparisons", [])}
    verdict: dict[str, str] = {}
    for c in report["gate"]["checks"]:
        verdict[c["metric"]] = "FAIL" if not c["passed"] or verdict.get(c["metric"]) == "FAIL" else "pass"
    rows = []
    for k in base:
        if k not in tuned:
            continue
        row: dict[str, Any] = {"metric": k, "base": _round(base[k])}
        if champion is not None:
            row["champion"] = _round(champion.get(k))
        row |= {"tuned": _round(tuned[k]), "delta": _round(tuned[k] - base[k])}
        row["interval"] = _interval(comparisons.get((k, "base")))
        if champion is not None:
            row["delta_champion"] = _round(tuned[k] - champion[k]) if k in champion else None
            row["interval_champion"] = _interval(comparisons.get((k, "champion")))
        row["gate"] = verdict.get(k, "-")
        rows.append(row)
    return rows


def _cell(text: Any, limit: int = 600) -> str:
    text = "" if text is None else str(text)
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _why(suite: str, row: dict[str, Any]) -> str:
    """What a scored row's verdict rests on: the two answers (GSM8K) or the sandbox status."""
    return f" (answer {row['predicted']}, gold {row['gold']})" if suite == "gsm8k" else f" ({row['status']})"


def samples_markdown(report: dict[str, Any], per_suite: int = 5) -> str:
    """Side-by-side answers: the samples prompts, the identity questions, and a few scored rows
    (those where the two models disagree first)."""
    gate = report["gate"]
    out = [f"**Quality gate: {'passed' if gate['passed'] else 'FAILED — ' + '; '.join(gate['reasons'])}**", ""]
    champion = report.get("champion")
    against = (
        f"base and champion {champion['release_id']} ({champion['how']})" if champion else "base (no champion yet)"
    )
    out += [f"Compared with: {against}." + (" Ungated: eval.gate_metrics is []." if gate.get("ungated") else ""), ""]
    s = report.get("samples", {})
    if "base" in s:
        out += ["## Samples", "", "| prompt | base | tuned |", "|---|---|---|"]
        out += [f"| {_cell(p)} | {_cell(b)} | {_cell(t)} |" for p, b, t in zip(s["prompts"], s["base"], s["tuned"])]
        out.append("")
    d = report.get("details", {})
    if d.get("self_cognition"):
        out += ["## Self-cognition", "", "| question | expects | base | tuned |", "|---|---|---|---|"]
        for b, t in zip(d["self_cognition"]["base"], d["self_cognition"]["tuned"]):
            out.append(
                f"| {_cell(b['prompt'])} | {_cell(b['expects'])} "
                f"| {_mark(b['correct'])} {_cell(b['answer'])} | {_mark(t['correct'])} {_cell(t['answer'])} |"
            )
        out.append("")
    for suite, key, title in (("gsm8k", "correct", "GSM8K"), ("humaneval", "passed", "HumanEval")):
        if not d.get(suite):
            continue
        pairs = list(zip(d[suite]["base"], d[suite]["tuned"]))
        pairs.sort(key=lambda bt: bt[0][key] == bt[1][key])  # disagreements first (stable)
        out += [
            f"## {title} (first {min(per_suite, len(pairs))} of {len(pairs)}, disagreements first)",
            "",
            "| item | base | tuned |",
            "|---|---|---|",
        ]
        for b, t in pairs[:per_suite]:
            item = b.get("question") or b.get("task_id")
            out.append(
                f"| {_cell(item, 300)} | {_mark(b[key])}{_cell(_why(suite, b))}<br>{_cell(b['completion'], 400)} "
                f"| {_mark(t[key])}{_cell(_why(suite, t))}<br>{_cell(t['completion'], 400)} |"
            )
        out.append("")
    return "\n".join(out)
