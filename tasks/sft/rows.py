"""The SFT stage's rows: a data stage split (JSON lines of chat ``messages``) as token ids in Arrow files on disk.

``arrow_rows`` reads the split a line at a time, tokenizes each row with the training chat template
(``tasks.core.models.tokenize_record``: input ids and assistant masks, the form TRL takes pre-tokenized),
checks that it keeps a trainable token within ``max_length`` and writes it through datasets' generator
builder to ``<scratch>/rows/rank<RANK>/<split>/``. The ``Dataset`` handed to TRL is memory-mapped from
there (TRL's own maps write their cache files next to it), so what stays in memory is one writer batch
of rows and a few running sums, however long the split. The check and the statistics the stage needs
(trainable tokens, mean and squared row lengths) come out of the same pass: the file is read once.

``tokenize_rows`` and ``check_trainable_tokens`` are the older in-memory forms (the whole split as Python
lists), kept for the benches and as the reference tests/test_sft_rows.py compares the Arrow rows with.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.models import tokenize_record

# Rows per Arrow record batch while writing: the most rows held in memory at once.
WRITER_BATCH = 1000


@dataclass
class RowStats:
    """What one pass over a split found: rows, trainable (assistant) tokens within ``max_length`` and
    the sums of the rows' lengths and squared lengths after truncation to ``max_length``."""

    rows: int = 0
    trainable_tokens: int = 0
    tokens: int = 0
    squared_tokens: int = 0

    @property
    def mean_row_tokens(self) -> float:
        return self.tokens / max(1, self.rows)

    def lengths_moment(self) -> float:
        """E[len^2] / E[len] of the truncated rows: what the attention FLOPs per token grow with."""
        return self.squared_tokens / self.tokens if self.tokens else 0.0


def _records(data_file: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every non-blank line; a line that is not a JSON object is an error naming it."""
    with open(data_file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{data_file} line {line_no}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise ValueError(f"{data_file} line {line_no}, field messages: missing or not a list of messages")
            yield line_no, record


def _tokenized(tokenizer: Any, data_file: Path, max_length: int | None) -> Iterator[tuple[int, dict]]:
    """(line number, ``tokenize_record``'s output) for every row; with ``max_length``, a row whose
    assistant tokens all lie past ``max_length`` is an error naming its line (see ``check_trainable_tokens``)."""
    for line_no, record in _records(data_file):
        out = tokenize_record(tokenizer, record)
        if max_length is not None and not any(out["assistant_masks"][:max_length]):
            raise ValueError(
                f"{data_file} line {line_no}, field messages: no assistant token within max_length={max_length} "
                f"(row is {len(out['input_ids'])} tokens); it would train on nothing. Shorten the prompt, raise "
                "max_length or drop the row."
            )
        yield line_no, out


def tokenize_rows(tokenizer: Any, data_file: Path) -> dict[str, list[list[int]]]:
    """Every row of a split as ``input_ids`` and ``assistant_masks`` lists in memory (the form
    ``Dataset.from_dict`` takes), rendered with the tokenizer's (training) chat template and the row's
    ``tools``. Done here rather than by TRL: a row keeps its tool schemas and call arguments as JSON text
    (Arrow would merge differing schemas and fill nulls), and templates need them parsed
    (``tasks.core.models.chat_inputs``). The stage itself uses ``arrow_rows``."""
    rows: dict[str, list[list[int]]] = {"input_ids": [], "assistant_masks": []}
    for _, out in _tokenized(tokenizer, data_file, None):
        rows["input_ids"].append(out["input_ids"])
        rows["assistant_masks"].append(out["assistant_masks"])
    return rows


def check_trainable_tokens(tokenizer: Any, data_file: Path, max_length: int) -> tuple[int, float]:
    """Every row must keep at least one assistant token after truncation to ``max_length``, else a
    micro-batch of it trains on nothing and its loss is a silent 0 (or NaN). Uses the training
    tokenization (the chat template's generation markers), before any model is loaded.
    Returns the number of trainable tokens and the mean row length in tokens (after truncation)."""
    stats = RowStats()
    for _, out in _tokenized(tokenizer, data_file, max_length):
        _count(stats, out, max_length)
    return stats.trainable_tokens, stats.mean_row_tokens


def _count(stats: RowStats, out: dict, max_length: int) -> None:
    n = min(len(out["input_ids"]), max_length)
    stats.rows += 1
    stats.trainable_tokens += sum(out["assistant_masks"][:max_length])
    stats.tokens += n
    stats.squared_tokens += n * n


def rows_dir(scratch: Path, rank: int, split: str) -> Path:
    """Where one process keeps one split's Arrow rows: ``<scratch>/rows/rank<RANK>/<split>/``."""
    return scratch / "rows" / f"rank{rank}" / split


def arrow_rows(
    tokenizer: Any, data_file: Path, cache_dir: Path, max_length: int, check: bool = True
) -> tuple[Any, RowStats]:
    """One split as a disk-backed ``datasets.Dataset`` of ``input_ids`` / ``assistant_masks`` (the same
    tokens, in the same order, as ``tokenize_rows``) and its ``RowStats``, in one pass over the file.
    ``check``: a row without a trainable token within ``max_length`` is an error naming its line.
    ``cache_dir`` is emptied first: the statistics come from the pass, so a retry never reuses old files."""
    from datasets import Dataset, Features, List, NamedSplit, Value
    from datasets.exceptions import DatasetGenerationError

    stats = RowStats()

    def generate() -> Iterator[dict]:
        for _, out in _tokenized(tokenizer, data_file, max_length if check else None):
            _count(stats, out, max_length)
            yield out

    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    # Token ids fit int32 and masks int8: a quarter of int64's disk; TRL reads them back as Python ints.
    features = Features({"input_ids": List(Value("int32")), "assistant_masks": List(Value("int8"))})
    try:
        dataset = Dataset.from_generator(
            generate,
            features=features,
            cache_dir=str(cache_dir),
            split=NamedSplit(Path(data_file).stem),
            writer_batch_size=WRITER_BATCH,
            fingerprint=f"tuneline-sft-rows-{Path(data_file).stem}",  # no hashing of the tokenizer
        )
    except DatasetGenerationError as e:  # datasets wraps the generator's error: show the row's own line
        raise (e.__cause__ or e) from None
    except ValueError:
        if stats.rows == 0:  # datasets' own words: 'Instruction "train" corresponds to no data!'
            raise ValueError(f"{data_file}: no rows to train or evaluate on (the file is empty)") from None
        raise
    return dataset, stats
