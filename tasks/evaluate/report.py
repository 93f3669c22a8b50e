"""The report rendered for people: the metrics table artifact and the side-by-side markdown."""

from __future__ import annotations

from typing import Any


def metrics_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the Prefect table artifact: metric, base, tuned, delta, and the gate's verdict."""
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    verdict = {c["metric"]: "pass" if c["passed"] else "FAIL" for c in report["gate"]["checks"]}
    return [
        {
            "metric": k,
            "base": round(base[k], 4),
            "tuned": round(tuned[k], 4),
            "delta": round(tuned[k] - base[k], 4),
            "gate": verdict.get(k, "-"),
        }
        for k in base
        if k in tuned
    ]


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
