"""The data stage's work as a plain function, ``prepare``: read and check every source, sample, count
tokens (deleting or truncating long rows), mix, dedupe, shuffle, split and write the output folder.
Also the sampling (``#N``), system-prompt and mixing rules it applies.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tasks.data.formats import load_source
from tasks.data.report import SourceReport, histogram, report_markdown, token_stats
from tasks.data.specs import DataError, DataParams, parse_spec
from tasks.data.tokens import QWEN2_FALLBACK, TokenCounter, load_tokenizer, truncate, write_tokens


def sample(rows: list[Any], n: int | None, rng: random.Random) -> list[Any]:
    """``#N``: without replacement up to the size; above it, whole copies plus a sampled remainder.

    >>> sample(list("abc"), 7, random.Random(0))[:6]
    ['a', 'b', 'c', 'a', 'b', 'c']
    """
    if n is None:
        return list(rows)
    copies, rest = divmod(n, len(rows))
    return list(rows) * copies + rng.sample(rows, rest)


def apply_system(messages: list[dict[str, str]], prompt: str, mode: str) -> list[dict[str, str]]:
    """Add the system prompt where a row has none (``missing``), or replace every row's (``force``)."""
    if not prompt:
        return messages
    if messages[0]["role"] != "system":
        return [{"role": "system", "content": prompt}, *messages]
    if mode == "force":
        return [{"role": "system", "content": prompt}, *messages[1:]]
    return messages


def mix(sampled: list[list[Any]], config: DataParams) -> list[Any]:
    """The sources' sampled rows as one list: concatenated, or interleaved with the configured probabilities."""
    if config.mixing == "concat" or len(sampled) == 1:
        return [row for rows in sampled for row in rows]
    # The interleaving itself is datasets': we interleave index columns and map them back.
    from datasets import Dataset, interleave_datasets

    parts = [Dataset.from_dict({"s": [k] * len(rows), "i": list(range(len(rows)))}) for k, rows in enumerate(sampled)]
    mixed = interleave_datasets(
        parts, probabilities=config.interleave_probs, seed=config.seed, stopping_strategy=config.interleave_stopping
    )
    return [sampled[s][i] for s, i in zip(mixed["s"], mixed["i"])]


def prepare(
    config: DataParams,
    out_dir: Path,
    model: str | None = None,
    revision: str = "main",
    storage_block: str | None = None,
) -> dict[str, Any]:
    """Build the train/validation split and the report in ``out_dir``; return the metrics.

    ``model`` (or ``config.tokenizer``, which wins) names the model whose tokenizer counts tokens."""
    specs = [parse_spec(s, config.hub) for s in config.datasets]  # every spec error before any reading
    for spec in specs:
        if spec.kind == "local":
            spec.files()
    rng = random.Random(config.seed)

    # 1. Read, convert, validate (cheap, before the tokenizer is loaded) and sample each source.
    #    Local and built-in sources first: a bad local file is reported even when a hub is down.
    loaded: dict[int, tuple[list[list[dict[str, str]]], SourceReport]] = {}
    for k in sorted(range(len(specs)), key=lambda k: specs[k].kind in ("hub", "s3")):
        loaded[k] = load_source(specs[k], config, storage_block)
        loaded[k][1].fingerprint = specs[k].fingerprint(storage_block)
    sampled: list[list[list[dict[str, str]]]] = []
    reports: list[SourceReport] = []
    for k, spec in enumerate(specs):  # sampling in spec order, so the result does not depend on the reading order
        rows, report = loaded[k]
        picked = [apply_system(m, config.system_prompt, config.system_mode) for m in sample(rows, spec.n, rng)]
        report.rows_sampled = len(picked)
        sampled.append(picked)
        reports.append(report)

    # 2. Count tokens with the model's tokenizer; rows over max_length are deleted or truncated.
    tokenizer, tokenizer_name = load_tokenizer(config.tokenizer or model, revision)
    counter = TokenCounter(tokenizer) if tokenizer is not None else None
    for k, (spec, report, picked) in enumerate(zip(specs, reports, sampled)):
        if counter is None:
            report.rows_kept = len(picked)
            continue
        kept = []
        for messages, length in zip(picked, counter.count(picked)):
            if isinstance(length, str):
                if config.strict:
                    raise DataError(f"{spec.text}: {length}")
                report.drop(length)
                continue
            if config.max_length and length > config.max_length:
                if config.truncation == "delete":
                    report.drop("longer than max_length")
                    continue
                short = truncate(messages, length, config.max_length, config.truncation.split("_")[1], counter)
                if short is None:
                    report.drop("longer than max_length, nothing left after truncation")
                    continue
                report.truncated += 1
                messages, length = short, counter.count([short])[0]
            kept.append(messages)
            report.lengths.append(length)
        sampled[k] = kept
        report.rows_kept = len(kept)
        report.tokens = token_stats(report.lengths)
        if not kept:
            raise DataError(f"{spec.text}: no row left after the max_length check (max_length={config.max_length})")

    # 3. Mix, dedupe, shuffle and split.
    mixed = mix(sampled, config)
    duplicates = 0
    if config.dedupe:
        seen: set[str] = set()
        unique = []
        for messages in mixed:
            key = json.dumps(messages, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                unique.append(messages)
        duplicates, mixed = len(mixed) - len(unique), unique
    if not mixed:
        raise DataError("no rows survived: nothing to train on")
    rng.shuffle(mixed)
    n_val = min(config.validation_max_rows, int(len(mixed) * config.validation_ratio))
    if config.validation_ratio > 0:
        n_val = max(n_val, 1)
    if len(mixed) - n_val < 1:
        raise DataError(f"only {len(mixed)} rows after mixing: nothing left to train on")
    validation, train = mixed[:n_val], mixed[n_val:]

    # 4. Write the splits (and their tokens) and the report.
    if config.pretokenize and (tokenizer is None or tokenizer_name.startswith(QWEN2_FALLBACK)):
        raise DataError(f"pretokenize needs the model's own tokenizer; tokens were counted by {tokenizer_name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("validation", validation)):
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in split)
        if config.pretokenize:
            write_tokens(tokenizer, split, out_dir / f"{name}.tokens.parquet")
    all_lengths = [n for r in reports for n in r.lengths]
    metrics = {
        "train_rows": len(train),
        "validation_rows": len(validation),
        "tokenizer": tokenizer_name,
        "max_length": config.max_length,
        "truncation": config.truncation,
        "mixing": config.mixing,
        "duplicates_dropped": duplicates,
        "tokens": token_stats(all_lengths),
        "sources": [r.as_dict() for r in reports],
    }
    (out_dir / "report.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    (out_dir / "report.md").write_text(report_markdown(metrics))
    if all_lengths:
        histogram(reports, config.max_length, tokenizer_name, out_dir / "token_lengths.png")
    return metrics
