"""The data stage's work as a plain function, ``prepare``: read and check every source, dedupe and split
it (``split``), sample its training part, count tokens (deleting or truncating long rows), mix, shuffle
and write the output folder. Also the sampling (``#N``), system-prompt and mixing rules it applies.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tasks.data import split
from tasks.data.formats import load_source
from tasks.data.overlap import held_out_check
from tasks.data.report import SourceReport, token_stats, write_report
from tasks.data.specs import SAMPLE_REPEAT, DataError, DataParams, Spec, parse_spec
from tasks.data.tokens import QWEN2_FALLBACK, TokenCounter, load_tokenizer, truncate, write_tokens
from tasks.data.tools import record, tools_of, with_tools

Messages = list[dict[str, str]]


def sample(rows: list[Any], n: int | None, rng: random.Random, shuffle: bool = True) -> list[Any]:
    """``#N``: without replacement up to the size; above it, whole copies plus a sampled remainder.
    Without shuffling the remainder is the first rows (ms-swift's ``sample_dataset``).

    >>> sample(list("abc"), 7, random.Random(0))[:6]
    ['a', 'b', 'c', 'a', 'b', 'c']
    >>> sample(list("abcde"), 2, random.Random(0), shuffle=False)
    ['a', 'b']
    """
    if n is None:
        return list(rows)
    copies, rest = divmod(n, len(rows))
    return list(rows) * copies + (rng.sample(rows, rest) if shuffle else list(rows[:rest]))


def apply_system(messages: list[dict[str, str]], prompt: str, mode: str) -> list[dict[str, str]]:
    """Add the system prompt where a row has none (``missing``), or replace every row's (``force``)."""
    if not prompt:
        return messages
    if messages[0]["role"] != "system":
        return with_tools([{"role": "system", "content": prompt}, *messages], tools_of(messages))
    if mode == "force":
        return with_tools([{"role": "system", "content": prompt}, *messages[1:]], tools_of(messages))
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


def fit_lengths(
    rows: list[Messages], spec: Spec, report: SourceReport, counter: TokenCounter | None, config: DataParams
) -> list[Messages]:
    """Count tokens; rows over max_length are deleted or truncated (counted in the source's report)."""
    if counter is None:
        return list(rows)
    kept = []
    for messages, length in zip(rows, counter.count(rows)):
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
    return kept


def _parse(texts: list[str], hub: str, what: str) -> list[Spec]:
    """Every spec parsed and every local one's files found, before any reading; ``what`` names the list."""
    try:
        specs = [parse_spec(s, hub) for s in texts]
        for spec in specs:
            if spec.kind == "local":
                spec.files()
    except DataError as e:
        raise DataError(f"{what}: {e}" if what else str(e)) from None
    return specs


def prepare(
    config: DataParams,
    out_dir: Path,
    model: str | None = None,
    revision: str = "main",
    storage_block: str | None = None,
) -> dict[str, Any]:
    """Build the train/validation split and the report in ``out_dir``; return the metrics.

    ``model`` (or ``config.tokenizer``, which wins) names the model whose tokenizer counts tokens."""
    specs = _parse(config.datasets, config.hub, "")
    val_specs = _parse(config.validation_datasets, config.hub, "data.validation_datasets")
    every = specs + val_specs
    is_val = [False] * len(specs) + [True] * len(val_specs)
    rng = random.Random(config.seed)

    # 1. Read, convert, validate and dedupe each source (cheap, before the tokenizer is loaded). Local
    #    sources first, validation sets first among them: a bad local file or an empty validation set is
    #    reported before a large or remote source is read.
    loaded: dict[int, tuple[list[Messages], SourceReport]] = {}
    for k in sorted(range(len(every)), key=lambda k: (every[k].kind in ("hub", "s3"), not is_val[k])):
        try:
            rows, report = load_source(every[k], config, storage_block)
        except DataError as e:
            raise DataError(f"data.validation_datasets: {e}" if is_val[k] else str(e)) from None
        report.fingerprint = every[k].fingerprint(storage_block)
        report.role = "validation" if is_val[k] else "train"
        rows, report.duplicates = split.dedupe(rows)
        loaded[k] = rows, report
    reports = [loaded[k][1] for k in range(len(every))]

    # 2. Split each source by its prompts' hashes, or take the validation sets as they are; then no
    #    training row may keep a validation prompt (a prompt two sources share, or one in a validation set).
    pools: list[list[Messages]] = []
    held_out: list[list[Messages]] = []
    for k, spec in enumerate(every):
        rows = loaded[k][0]
        if is_val[k]:
            pools.append([])
            held_out.append(split.lowest(rows, spec.n))
        elif val_specs:
            pools.append(rows)
            held_out.append([])
        else:  # by the prompt's hash alone, not data.seed: a row keeps its side from night to night
            train, validation = split.split_rows(rows, config.validation_ratio)
            pools.append(train)
            held_out.append(validation)
    prompts = {split.prompt_key(m) for part in held_out for m in part}
    for k, spec in enumerate(specs):
        pools[k], reports[k].removed_for_validation = split.remove_prompts(pools[k], prompts)
        if not pools[k]:
            raise DataError(
                f"{spec.text}: every prompt of the source is a validation prompt; nothing left to train on "
                "(add rows, lower validation_ratio, or check data.validation_datasets)"
            )

    # 3. Sample the training parts (#N, from training prompts only) in spec order, so the result does not
    #    depend on the reading order; validation rows are taken once each, never repeated.
    sampled: list[list[Messages]] = []
    for k, spec in enumerate(every):
        if spec.n and pools[k] and spec.n > SAMPLE_REPEAT * len(pools[k]):  # before building a huge list
            raise DataError(
                f"{spec.text}: #{spec.n} asks for more than {SAMPLE_REPEAT} times the source's "
                f"{len(pools[k])} training rows (at most #{SAMPLE_REPEAT * len(pools[k])})"
            )
        picked = sample(pools[k], spec.n, rng, config.shuffle) if pools[k] else []
        reports[k].rows_sampled = len(picked)
        sampled.append([apply_system(m, config.system_prompt, config.system_mode) for m in picked])
        held_out[k] = [apply_system(m, config.system_prompt, config.system_mode) for m in held_out[k]]

    # 4. Count tokens with the model's tokenizer; rows over max_length are deleted or truncated.
    tokenizer, tokenizer_name = load_tokenizer(config.tokenizer or model, revision)
    counter = TokenCounter(tokenizer) if tokenizer is not None else None
    for k, (spec, report) in enumerate(zip(every, reports)):
        sampled[k] = fit_lengths(sampled[k], spec, report, counter, config)
        held_out[k] = fit_lengths(held_out[k], spec, report, counter, config)
        report.tokens = token_stats(report.lengths)
        if not (held_out[k] if is_val[k] else sampled[k]):
            what = "data.validation_datasets: " if is_val[k] else ""
            raise DataError(
                f"{what}{spec.text}: no row left after the max_length check (max_length={config.max_length})"
            )

    # 5. Cap the validation rows (the smallest hashes stay). The rows over the cap are not moved to train:
    #    their side would then depend on the cap and the other sources, and would change between nights.
    #    Truncation may have turned a training prompt into a validation one: such rows go too, so nothing
    #    written is on both sides.
    held_out = split.cap(held_out, config.validation_max_rows)
    prompts |= {split.prompt_key(m) for part in held_out for m in part}
    for k in range(len(specs)):
        sampled[k], removed = split.remove_prompts(sampled[k], prompts)
        reports[k].removed_for_validation += removed
    for k, report in enumerate(reports):
        report.rows_kept, report.rows_validation = len(sampled[k]), len(held_out[k])

    # 6. Mix the training parts, dedupe, shuffle; validation rows in prompt-hash order.
    mixed = mix(sampled[: len(specs)], config)
    duplicates = 0
    if config.dedupe:
        unique, duplicates = split.dedupe(mixed)
        mixed = unique
    if not mixed:
        raise DataError("no training rows survived: nothing to train on")
    if config.shuffle:
        rng.shuffle(mixed)
    train, validation = mixed, split.in_hash_order(held_out)

    # 7. Write the splits (and their tokens) and the report.
    if config.pretokenize and (tokenizer is None or tokenizer_name.startswith(QWEN2_FALLBACK)):
        raise DataError(f"pretokenize needs the model's own tokenizer; tokens were counted by {tokenizer_name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record(m), ensure_ascii=False) + "\n" for m in rows)
        if config.pretokenize:
            write_tokens(tokenizer, rows, out_dir / f"{name}.tokens.parquet")
    all_lengths = [n for r in reports for n in r.lengths]
    validation_from = f"prompt-hash split, ratio {config.validation_ratio}, at most {config.validation_max_rows}"
    if val_specs:
        validation_from = "data.validation_datasets"
    elif config.validation_ratio == 0:
        validation_from = "none: validation_ratio is 0"
    counts = {
        "train_rows": len(train),
        "validation_rows": len(validation),
        "train_validation_prompt_overlap": split.prompt_overlap(train, validation),
        "held_out_check": held_out_check(train, validation),
        "duplicates_dropped": duplicates,
    }
    return write_report(out_dir, config, reports, counts, validation_from, tokenizer_name, all_lengths)
