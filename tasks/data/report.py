"""The data stage's report: per-source counts (``SourceReport``), token statistics, the per-source table
(terminal text and markdown), the split's totals (with the train/validation prompt overlap) and the
token-length histogram."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tasks.data.overlap import check_line

REPORT_COLUMNS = [
    "source",
    "format",
    "read",
    "valid",
    "duplicates",
    "validation",
    "removed for validation",
    "sampled",
    "truncated",
    "kept",
    "dropped",
    "tokens min/median/p95/max",
]


MAX_SKIPPED_LISTED = 1000  # report.json lists this many skipped rows per source; the count stays exact


def row_where(file: str, row: int, field: str = "") -> str:
    """Where a bad row is: ``file: row N: field 'F'``."""
    return f"{file}: row {row}" + (f": field '{field}'" if field else "")


def skipped_text(file: str, row: int, field: str, reason: str) -> str:
    """A bad row for people: ``file: row N: field 'F': reason`` (the strict mode's error)."""
    return f"{row_where(file, row, field)}: {reason}"


@dataclass
class SourceReport:
    """What happened to one source's rows: read, valid, duplicates, held out for validation, sampled for
    training, kept, dropped by reason, token lengths (of every row written, train and validation)."""

    spec: str
    role: str = "train"  # train (a data.datasets source: train rows and its hash-split validation rows) or validation
    fingerprint: str = ""  # the source's content (checksum, ETag, hub revision): lineage for the release
    format: str = "?"
    rows_read: int = 0
    rows_valid: int = 0
    duplicates: int = 0  # exact duplicates of a normalised conversation within the source, dropped
    rows_validation: int = 0  # rows written to validation.jsonl
    removed_for_validation: int = 0  # training rows whose prompt is a validation prompt, removed
    rows_sampled: int = 0  # training rows drawn by #N (from the training part only)
    rows_kept: int = 0  # training rows left after the max_length check
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # first rows dropped for each reason
    rows_skipped: int = 0  # rows that failed validation, skipped within data.max_bad_rows
    skipped: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_SKIPPED_LISTED (file, row, field, why)
    tokens: dict[str, int] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list, repr=False)

    def drop(self, reason: str, where: str = "") -> None:
        key = reason_key(reason)
        self.dropped[key] = self.dropped.get(key, 0) + 1
        if where and len(seen := self.examples.setdefault(key, [])) < 3:
            seen.append(f"{where}: {reason}")

    def skip(self, file: str, row: int, field: str, reason: str) -> None:
        """A row that failed validation, skipped: counted by reason and listed where it is."""
        self.rows_skipped += 1
        if len(self.skipped) < MAX_SKIPPED_LISTED:
            self.skipped.append({"file": file, "row": row, "field": field, "reason": reason})
        self.drop(reason, row_where(file, row, field))

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "lengths"}


def reason_key(reason: str) -> str:
    """Reasons grouped for counting: the text without row-specific numbers and quoted values.

    >>> reason_key("invalid UTF-8 (byte 0xe9 at column 12)")
    'invalid UTF-8'
    >>> reason_key("system turn at position 3: only the first turn may be a system turn")
    'system turn at position N: only the first turn may be a system turn'
    """
    return re.sub(r"(?<![-\w])\d+", "N", re.sub(r"'[^']*'", "…", reason.split(" (")[0]))


def token_stats(lengths: Sequence[int]) -> dict[str, int]:
    """min / median / p95 / max / total of token lengths; empty for no rows.

    >>> token_stats([5, 1, 3])
    {'min': 1, 'median': 3, 'p95': 5, 'max': 5, 'total': 9}
    """
    if not len(lengths):
        return {}
    import numpy as np  # sorted in numpy: a list of millions of Python ints would cost ~36 bytes a row

    ordered = np.sort(np.asarray(lengths, dtype=np.int64))
    n, mid = len(ordered), len(ordered) // 2
    median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2  # statistics.median's rule
    return {
        "min": int(ordered[0]),
        "median": int(median),
        "p95": int(ordered[min(n - 1, int(0.95 * n))]),
        "max": int(ordered[-1]),
        "total": int(ordered.sum()),
    }


def report_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per source, the columns of the report table."""
    rows = []
    for s in metrics["sources"]:
        t = s["tokens"]
        rows.append(
            {
                "source": s["spec"] + (" (validation)" if s.get("role") == "validation" else ""),
                "format": s["format"],
                "read": s["rows_read"],
                "valid": s["rows_valid"],
                "duplicates": s.get("duplicates", 0),
                "validation": s.get("rows_validation", 0),
                "removed for validation": s.get("removed_for_validation", 0),
                "sampled": s["rows_sampled"],
                "truncated": s["truncated"],
                "kept": s["rows_kept"],
                "dropped": ", ".join(f"{reason}: {n}" for reason, n in sorted(s["dropped"].items())) or "-",
                "tokens min/median/p95/max": f"{t['min']}/{t['median']}/{t['p95']}/{t['max']}" if t else "-",
            }
        )
    return rows


def split_lines(metrics: dict[str, Any]) -> list[str]:
    """The totals under the table: rows per split, how validation was chosen, duplicates, removals and
    the prompt overlap (prompts in both splits of the written output; 0 unless something is wrong)."""
    removed = metrics.get("removed_for_validation", 0)
    return [
        f"train {metrics['train_rows']} rows, validation {metrics['validation_rows']} rows "
        f"({metrics.get('validation_from', 'hash split')})",
        f"duplicates dropped: {metrics.get('source_duplicates', 0)} within sources, "
        f"{metrics['duplicates_dropped']} after mixing; {removed} training rows removed for a validation prompt",
        f"train/validation prompt overlap: {metrics.get('train_validation_prompt_overlap', '?')} prompts",
        check_line(metrics.get("held_out_check")),
        f"tokens counted by: {metrics['tokenizer']} (max_length {metrics['max_length']}, {metrics['truncation']})",
    ]


def skipped_lines(metrics: dict[str, Any], limit: int = 20) -> list[str]:
    """The rows skipped for failing validation (``data.max_bad_rows``), where and why; report.json has up
    to ``MAX_SKIPPED_LISTED`` per source."""
    lines = []
    for s in metrics["sources"]:
        if s.get("rows_skipped"):
            lines.append(f"{s['spec']}: {s['rows_skipped']} of {s['rows_read']} rows skipped (failed validation)")
            lines += [f"  skipped {skipped_text(**row)}" for row in s["skipped"][:limit]]
    return lines


def report_text(metrics: dict[str, Any]) -> str:
    """The per-source table and the totals, for a terminal (``tuneline data check`` prints it)."""
    rows = report_rows(metrics)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in REPORT_COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in REPORT_COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in REPORT_COLUMNS) for r in rows]
    return "\n".join([*lines, "", *split_lines(metrics), *skipped_lines(metrics)])


def report_markdown(metrics: dict[str, Any]) -> str:
    """The per-source table and the totals as markdown (``report.md`` and the Prefect artifact)."""
    rows = report_rows(metrics)
    table = ["| " + " | ".join(REPORT_COLUMNS) + " |", "|" + "---|" * len(REPORT_COLUMNS)]
    table += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in REPORT_COLUMNS) + " |" for r in rows]
    totals = "".join(f"- {line}\n" for line in split_lines(metrics) + skipped_lines(metrics))
    return "# Dataset report\n\n" + "\n".join(table) + "\n\n" + totals


def histogram(reports: list[SourceReport], max_length: int | None, tokenizer_name: str, path: Path) -> None:
    """Tokens per conversation, stacked by source, with the max_length line when it is in range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    top = max(max(r.lengths, default=0) for r in reports)
    bins = list(range(0, top + max(1, top // 40) + 1, max(1, top // 40)))
    labels = [r.spec if len(r.spec) <= 50 else "…" + r.spec[-49:] for r in reports]
    ax.hist([r.lengths for r in reports], bins=bins, stacked=True, label=labels)
    if max_length and max_length <= top * 1.5:
        ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel(f"tokens per conversation ({tokenizer_name.split(';')[0]})")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths by source")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    out_dir: Path,
    config: Any,
    reports: list[SourceReport],
    counts: dict[str, Any],
    validation_from: str,
    tokenizer_name: str,
    all_lengths: Sequence[int],
) -> dict[str, Any]:
    """The data stage's report (report.json, report.md, the token-length histogram), shared by the
    streaming stage and its in-memory reference so both write the same bytes. ``counts``: ``train_rows``,
    ``validation_rows``, ``train_validation_prompt_overlap``, ``held_out_check``, ``duplicates_dropped``."""
    metrics = {
        "train_rows": counts["train_rows"],
        "validation_rows": counts["validation_rows"],
        "validation_from": validation_from,
        "train_validation_prompt_overlap": counts["train_validation_prompt_overlap"],
        "held_out_check": counts["held_out_check"],  # an independent, stricter key: may disagree
        "removed_for_validation": sum(r.removed_for_validation for r in reports),
        "source_duplicates": sum(r.duplicates for r in reports),
        "tokenizer": tokenizer_name,
        "max_length": config.max_length,
        "truncation": config.truncation,
        "mixing": config.mixing,
        "duplicates_dropped": counts["duplicates_dropped"],
        "tokens": token_stats(all_lengths),
        "sources": [r.as_dict() for r in reports],
    }
    (out_dir / "report.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    (out_dir / "report.md").write_text(report_markdown(metrics))
    if all_lengths:
        histogram(reports, config.max_length, tokenizer_name, out_dir / "token_lengths.png")
    return metrics
