"""The data stage for sources of any size: ``prepare`` does what ``mix.prepare`` (the in-memory reference)
does, step for step and byte for byte, while its memory stays flat as the sources grow.

Rows are read as a stream (``formats.iter_source``), deduplicated against keys kept on disk
(``DiskSet``, SQLite) and written once to a spool file (``Spool``); from then on a row is its number
(8 bytes) and its prompt's 64-bit hash (8 bytes). Split, ``#N`` sampling, the validation cap, mixing and
shuffling work on those numbers: ``random`` draws the same numbers from a range of a source's size as from
the list of its rows, so the seed picks the same rows. Tokens are counted a chunk at a time; the output is
written a row at a time. What still grows with the rows: 16-24 bytes a row (numbers, hashes, lengths), the
set of validation prompts' hashes (``validation_ratio`` of the prompts) and, with ``mixing: interleave``,
the index columns handed to ``datasets``. docs/data.md "Big sources" has the design and its limits.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import sqlite3
import tempfile
from array import array
from pathlib import Path
from typing import Any, Iterator

from tasks.core.common import run_logger
from tasks.data import split
from tasks.data.formats import iter_source
from tasks.data.mix import _parse, apply_system, mix
from tasks.data.overlap import HeldOutCheck
from tasks.data.report import SourceReport, token_stats, write_report
from tasks.data.specs import SAMPLE_REPEAT, DataError, DataParams, Spec
from tasks.data.tokens import QWEN2_FALLBACK, TokenCounter, load_tokenizer, truncate, write_tokens
from tasks.data.tools import record

Messages = list[dict[str, Any]]
PROGRESS_EVERY = 100_000  # rows between progress lines (the run's log in Prefect, else the "tuneline" logger)
CHUNK = 1000  # rows whose tokens are counted together (one batch for the Rust tokenizer)
SCALE = 2**64  # a prompt hash (64-bit int) over this is split.position, the same float


def place(messages: Messages) -> int:
    """The prompt's hash as an integer: ``split.position`` is this over 2**64 (the same float)."""
    return int(hashlib.sha256(split.prompt_key(messages).encode("utf-8")).hexdigest()[:16], 16)


class Spool:
    """Rows on disk, addressed by number: JSON (ASCII-escaped, so any string survives) appended to one
    file; in memory only each row's offset and its prompt's hash."""

    def __init__(self, path: Path):
        self._file = open(path, "w+b")
        self._offsets = array("q", [0])
        self.places = array("Q")
        self._unflushed = False

    def __len__(self) -> int:
        return len(self.places)

    def add(self, messages: Messages, prompt_place: int | None = None) -> int:
        data = json.dumps(messages).encode("ascii")
        self._file.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        self.places.append(place(messages) if prompt_place is None else prompt_place)
        self._unflushed = True
        return len(self.places) - 1

    def get(self, i: int) -> Messages:
        if self._unflushed:
            self._file.flush()
            self._unflushed = False
        start = self._offsets[i]
        return json.loads(os.pread(self._file.fileno(), self._offsets[i + 1] - start, start))

    def close(self) -> None:
        self._file.close()


class DiskSet:
    """A set of keys in SQLite (128-bit digests): dedupe state that does not have to fit in memory.
    SQLite rather than a hand-made hash file: it is in the standard library and its B-tree pages
    through a bounded cache."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-32768"):  # scratch data: no journal
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE seen (k BLOB PRIMARY KEY) WITHOUT ROWID")
        self._db.execute("BEGIN")

    def add(self, key: str) -> bool:
        """Add ``key``; True when it was not there yet."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:16]
        return self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (digest,)).rowcount == 1

    def close(self) -> None:
        self._db.close()


class Rows:
    """Every row of the stage: the sources' rows (numbers ≥ 0, stored as read; the system prompt is
    applied when one is loaded) and the rows truncation shortened (numbers < 0, stored as final)."""

    def __init__(self, folder: Path, config: DataParams):
        self.raw, self.cut, self.config = Spool(folder / "rows"), Spool(folder / "cut"), config

    def load(self, fid: int) -> Messages:
        if fid < 0:
            return self.cut.get(~fid)
        return apply_system(self.raw.get(fid), self.config.system_prompt, self.config.system_mode)

    def place(self, fid: int) -> int:
        return self.cut.places[~fid] if fid < 0 else self.raw.places[fid]

    def position(self, fid: int) -> float:
        return self.place(fid) / SCALE


class Fitter:
    """``mix.fit_lengths`` over row numbers: each distinct row is counted (and truncated) once, a chunk at
    a time; its result is kept per row number (length, final row, or the reason it was dropped)."""

    def __init__(self, rows: Rows, counter: TokenCounter, config: DataParams):
        self.rows, self.counter, self.config = rows, counter, config
        size = len(rows.raw)
        self.length = array("i", [-1]) * size  # -1: not counted yet; -2 - k: dropped for reasons[k]
        self.final = array("q", [0]) * size
        self.reasons: list[str] = []
        self.template_errors: set[int] = set()

    def _drop(self, fid: int, reason: str, template: bool = False) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        code = self.reasons.index(reason)
        self.length[fid] = -2 - code
        if template:
            self.template_errors.add(code)

    def _count(self, fids: list[int]) -> None:
        config, counter = self.config, self.counter
        todo = list(dict.fromkeys(f for f in fids if self.length[f] == -1))
        conversations = [self.rows.load(f) for f in todo]
        for fid, messages, length in zip(todo, conversations, counter.count(conversations)):
            if isinstance(length, str):
                self._drop(fid, length, template=True)
                continue
            final = fid
            if config.max_length and length > config.max_length:
                if config.truncation == "delete":
                    self._drop(fid, "longer than max_length")
                    continue
                short = truncate(messages, length, config.max_length, config.truncation.split("_")[1], counter)
                if short is None:
                    self._drop(fid, "longer than max_length, nothing left after truncation")
                    continue
                final, length = ~self.rows.cut.add(short), counter.count([short])[0]
            self.length[fid], self.final[fid] = length, final
        counter.forget()

    def fit(self, fids: array, spec: Spec, report: SourceReport) -> array:
        """The rows kept, as final row numbers; the report counts drops, truncations and lengths in row order."""
        kept = array("q")
        for start in range(0, len(fids), CHUNK):
            if start and start % PROGRESS_EVERY == 0:
                run_logger().info("%s: tokens counted for %d of %d rows", spec.text, start, len(fids))
            chunk = fids[start : start + CHUNK]
            self._count(list(chunk))
            for fid in chunk:
                length = self.length[fid]
                if length < 0:
                    code = -2 - length
                    if self.config.strict and code in self.template_errors:
                        raise DataError(f"{spec.text}: {self.reasons[code]}")
                    report.drop(self.reasons[code])
                    continue
                final = self.final[fid]
                report.truncated += final != fid
                kept.append(final)
                report.lengths.append(length)
        return kept


def _split(ids: array, ratio: float, places: array) -> tuple[array, array, set[int]]:
    """``split.split_rows`` on row numbers: (train, validation, the validation prompts' hashes)."""
    if ratio <= 0 or not ids:
        return ids, array("q"), set()
    held = {places[i] for i in ids if places[i] / SCALE < ratio}
    if not held and any(places[i] != places[ids[0]] for i in ids):
        held = {min(places[i] for i in ids)}
    train = array("q", (i for i in ids if places[i] not in held))
    return train, array("q", (i for i in ids if places[i] in held)), held


def _sample(pool: array, n: int | None, rng: random.Random, shuffle: bool) -> array:
    """``mix.sample`` on row numbers: ``rng.sample`` of a range draws what it draws from a list of that size."""
    if n is None:
        return pool  # not copied: nothing changes an array in place after this
    copies, rest = divmod(n, len(pool))
    picked = pool * copies
    if shuffle:
        picked.extend(pool[j] for j in rng.sample(range(len(pool)), rest))
    else:
        picked.extend(pool[:rest])
    return picked


def _cap(held: list[array], max_rows: int, rows: Rows) -> list[array]:
    """``split.cap`` on row numbers: only a source's ``max_rows`` lowest rows can be chosen, so only they
    are ranked (a bounded heap per source)."""
    ranked = sorted(
        entry
        for k, part in enumerate(held)
        for entry in heapq.nsmallest(max_rows, ((rows.position(f), k, i) for i, f in enumerate(part)))
    )
    chosen = split.capped(ranked, max_rows)
    return [array("q", (f for i, f in enumerate(part) if (k, i) in chosen)) for k, part in enumerate(held)]


def _read(every: list[Spec], is_val: list[bool], config: DataParams, rows: Rows, tmp: Path, storage_block: str | None):
    """Step 1: read, convert, validate and dedupe each source into the spool (order: see ``mix.prepare``)."""
    ids: dict[int, array] = {}
    reports: dict[int, SourceReport] = {}
    for k in sorted(range(len(every)), key=lambda k: (every[k].kind in ("hub", "s3"), not is_val[k])):
        report, seen, mine = SourceReport(spec=every[k].text), DiskSet(tmp / f"seen-{k}"), array("q")
        try:
            for messages in iter_source(every[k], config, report, storage_block):
                if seen.add(split.conversation_key(messages)):
                    mine.append(rows.raw.add(messages))
                else:
                    report.duplicates += 1
                if report.rows_read % PROGRESS_EVERY == 0:
                    run_logger().info("%s: %d rows read, %d kept", every[k].text, report.rows_read, len(mine))
        except DataError as e:
            raise DataError(f"data.validation_datasets: {e}" if is_val[k] else str(e)) from None
        finally:
            seen.close()
        report.fingerprint = every[k].fingerprint(storage_block)
        report.role = "validation" if is_val[k] else "train"
        report.lengths = array("i")
        ids[k], reports[k] = mine, report
    return [ids[k] for k in range(len(every))], [reports[k] for k in range(len(every))]


def prepare(
    config: DataParams,
    out_dir: Path,
    model: str | None = None,
    revision: str = "main",
    storage_block: str | None = None,
) -> dict[str, Any]:
    """Build the train/validation split and the report in ``out_dir``; return the metrics (as
    ``mix.prepare``, the same bytes). Scratch state (the spool, the dedupe sets) lives in a temporary
    folder under ``TMPDIR`` for the stage's duration: about the size of the sources' rows."""
    with tempfile.TemporaryDirectory(prefix="tuneline-data-") as tmp:
        rows = Rows(Path(tmp), config)
        try:
            return _prepare(config, out_dir, model, revision, storage_block, rows, Path(tmp))
        finally:
            rows.raw.close()
            rows.cut.close()


def _prepare(
    config: DataParams,
    out_dir: Path,
    model: str | None,
    revision: str,
    storage_block: str | None,
    rows: Rows,
    tmp: Path,
) -> dict[str, Any]:
    specs = _parse(config.datasets, config.hub, "")
    val_specs = _parse(config.validation_datasets, config.hub, "data.validation_datasets")
    every = specs + val_specs
    is_val = [False] * len(specs) + [True] * len(val_specs)
    rng = random.Random(config.seed)
    ids, reports = _read(every, is_val, config, rows, tmp, storage_block)
    places = rows.raw.places

    # 2. Split, or take the validation sets' lowest #N; training rows lose every validation prompt.
    pools: list[array] = []
    held: list[array] = []
    prompts: set[int] = set()  # the validation prompts' hashes (64 bits: the prompt keys themselves, in effect)
    for k, spec in enumerate(every):
        if is_val[k]:
            chosen = part = ids[k]
            if spec.n is not None and spec.n < len(part):
                by_hash = lambda i, part=part: (places[part[i]] / SCALE, i)  # noqa: E731 - split.lowest's order
                lowest = heapq.nsmallest(spec.n, range(len(part)), key=by_hash)
                chosen = array("q", (part[i] for i in sorted(lowest)))
            pools.append(array("q"))
            held.append(chosen)
            prompts.update(places[i] for i in chosen)
        elif val_specs:
            pools.append(ids[k])
            held.append(array("q"))
        else:
            train, validation, held_places = _split(ids[k], config.validation_ratio, places)
            pools.append(train)
            held.append(validation)
            prompts |= held_places
    for k, spec in enumerate(specs):
        before = len(pools[k])
        pools[k] = array("q", (i for i in pools[k] if places[i] not in prompts))
        reports[k].removed_for_validation = before - len(pools[k])
        if not pools[k]:
            raise DataError(
                f"{spec.text}: every prompt of the source is a validation prompt; nothing left to train on "
                "(add rows, lower validation_ratio, or check data.validation_datasets)"
            )

    # 3. Sample the training parts in spec order (the same draws as mix.prepare).
    sampled: list[array] = []
    for k, spec in enumerate(every):
        if spec.n and pools[k] and spec.n > SAMPLE_REPEAT * len(pools[k]):
            raise DataError(
                f"{spec.text}: #{spec.n} asks for more than {SAMPLE_REPEAT} times the source's "
                f"{len(pools[k])} training rows (at most #{SAMPLE_REPEAT * len(pools[k])})"
            )
        sampled.append(_sample(pools[k], spec.n, rng, config.shuffle) if pools[k] else array("q"))
        reports[k].rows_sampled = len(sampled[k])
    del ids, pools  # what the steps below need is in `sampled` and `held`

    # 4. Count tokens, a chunk at a time; rows over max_length are deleted or truncated.
    tokenizer, tokenizer_name = load_tokenizer(config.tokenizer or model, revision)
    fitter = Fitter(rows, TokenCounter(tokenizer), config) if tokenizer is not None else None
    for k, (spec, report) in enumerate(zip(every, reports)):
        if fitter is not None:
            sampled[k] = fitter.fit(sampled[k], spec, report)
            held[k] = fitter.fit(held[k], spec, report)
            run_logger().info("%s: tokens counted for %d rows", spec.text, len(sampled[k]) + len(held[k]))
        report.tokens = token_stats(report.lengths)
        if not (held[k] if is_val[k] else sampled[k]):
            what = "data.validation_datasets: " if is_val[k] else ""
            raise DataError(
                f"{what}{spec.text}: no row left after the max_length check (max_length={config.max_length})"
            )

    # 5. Cap the validation rows; training rows whose (truncated) prompt is now a validation one go.
    held = _cap(held, config.validation_max_rows, rows)
    prompts.update(rows.place(f) for part in held for f in part)
    for k in range(len(specs)):
        before = len(sampled[k])
        sampled[k] = array("q", (f for f in sampled[k] if rows.place(f) not in prompts))
        reports[k].removed_for_validation += before - len(sampled[k])
    for k, report in enumerate(reports):
        report.rows_kept, report.rows_validation = len(sampled[k]), len(held[k])

    # 6. Mix, dedupe, shuffle (row numbers); validation rows in prompt-hash order.
    parts = sampled[: len(specs)]
    mixed = array("q", mix([list(p) for p in parts], config)) if config.mixing != "concat" and len(parts) > 1 else None
    if mixed is None:
        mixed = array("q")
        for part in parts:
            mixed.extend(part)
    duplicates = 0
    if config.dedupe:
        seen = DiskSet(tmp / "seen-mixed")
        unique = array("q", (f for f in mixed if seen.add(split.conversation_key(rows.load(f)))))
        seen.close()
        duplicates, mixed = len(mixed) - len(unique), unique
    if not mixed:
        raise DataError("no training rows survived: nothing to train on")
    if config.shuffle:
        rng.shuffle(mixed)  # the same permutation as of a list of this length
    ranked = sorted((rows.position(f), k, i) for k, part in enumerate(held) for i, f in enumerate(part))
    validation = [rows.load(held[k][i]) for _, k, i in ranked]

    # 7. Write the splits (and their tokens) and the report, a row at a time.
    if config.pretokenize and (tokenizer is None or tokenizer_name.startswith(QWEN2_FALLBACK)):
        raise DataError(f"pretokenize needs the model's own tokenizer; tokens were counted by {tokenizer_name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    check, val_places, overlap = HeldOutCheck(validation), {rows.place(held[k][i]) for _, k, i in ranked}, set()

    def train_rows() -> Iterator[Messages]:
        for n, fid in enumerate(mixed, 1):
            if n % PROGRESS_EVERY == 0:
                run_logger().info("train.jsonl: %d of %d rows written", n, len(mixed))
            yield rows.load(fid)

    with open(out_dir / "train.jsonl", "w", encoding="utf-8") as f:
        for fid, messages in zip(mixed, train_rows()):
            f.write(json.dumps(record(messages), ensure_ascii=False) + "\n")
            check.see(messages)
            if (prompt := rows.place(fid)) in val_places:  # the prompt overlap, by the prompts' 64-bit hashes
                overlap.add(prompt)
    with open(out_dir / "validation.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record(m), ensure_ascii=False) + "\n" for m in validation)
    if config.pretokenize:
        write_tokens(tokenizer, train_rows(), out_dir / "train.tokens.parquet")
        write_tokens(tokenizer, validation, out_dir / "validation.tokens.parquet")
    all_lengths = array("i")
    for r in reports:
        all_lengths.extend(r.lengths)
    validation_from = f"prompt-hash split, ratio {config.validation_ratio}, at most {config.validation_max_rows}"
    if val_specs:
        validation_from = "data.validation_datasets"
    elif config.validation_ratio == 0:
        validation_from = "none: validation_ratio is 0"
    counts = {
        "train_rows": len(mixed),
        "validation_rows": len(validation),
        "train_validation_prompt_overlap": len(overlap),
        "held_out_check": check.counts(),
        "duplicates_dropped": duplicates,
    }
    return write_report(out_dir, config, reports, counts, validation_from, tokenizer_name, all_lengths)
