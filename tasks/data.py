"""Dataset stage: read the sources named in the parameters, sample, mix, validate, split.

Resource profile: CPU only, a few seconds for the demo mix.

Spec grammar (ms-swift's): ``SOURCE[#N]``. SOURCE is
- a local file (``.json``, ``.jsonl``) in alpaca (instruction / input / output), OpenAI messages
  (``messages`` with role / content) or query / response form;
- ``swift/self-cognition`` — the project's own self-cognition set (English and Chinese) with
  ``{{NAME}}`` / ``{{AUTHOR}}`` filled from ``model_name`` / ``model_author``;
- ``tuneline/arithmetic`` — generated arithmetic questions with exact answers (offline demo data);
- anything else: a Hugging Face hub dataset id, loaded with ``datasets.load_dataset``.
``#N`` samples N rows without replacement when N ≤ size; above the size it repeats the whole set and
samples the remainder, as ms-swift does. Sampling is reproducible from ``seed``.

Output folder: ``train.jsonl`` and ``validation.jsonl`` (one ``{"messages": [...]}`` per line) and
``report.json`` (rows per source, split sizes).

Run the plain function without Prefect::

    python -c "from tasks.data import DataConfig, prepare; from pathlib import Path; \
        print(prepare(DataConfig(datasets=['swift/self-cognition#20']), Path('/tmp/data')))"
"""
from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.store import StageRef, code_version, fingerprint, sha256_file, stage_cache_key, store_for

STAGE = "data"
RESOURCES = Path(__file__).parent / "resources"
BUILTIN = {"swift/self-cognition", "tuneline/arithmetic"}
_SPEC = re.compile(r"^(?P<source>.+?)(?:#(?P<n>[^#]*))?$")


class DataError(ValueError):
    """Bad dataset input; the message names the source (file), row and field."""


class DataConfig(BaseModel):
    """Which data to train on and how to mix it."""

    model_config = ConfigDict(extra="forbid")

    datasets: list[str] = Field(
        default=[
            "AI-ModelScope/alpaca-gpt4-data-zh#500",
            "AI-ModelScope/alpaca-gpt4-data-en#500",
            "swift/self-cognition#500",
        ],
        min_length=1,
        description="Sources as SOURCE[#N]: a hub id, a local .json/.jsonl file, swift/self-cognition or "
        "tuneline/arithmetic; #N samples N rows (repeating the set when N is larger than it).",
    )
    system_prompt: str = Field(
        default="You are a helpful, witty, and culturally aware assistant.",
        max_length=4000,
        description="System prompt added to every conversation that has none. Empty: none added.",
    )
    model_name: str = Field(
        default="Tuneline Assistant", min_length=1, max_length=100,
        description="The name the tuned model gives itself; fills {{NAME}} in self-cognition data.",
    )
    model_author: str = Field(
        default="the Tuneline team", min_length=1, max_length=100,
        description="Who the tuned model says made it; fills {{AUTHOR}} in self-cognition data.",
    )
    validation_ratio: float = Field(
        default=0.05, ge=0.0, le=0.5,
        description="Share of the mixed rows held out for validation (the SFT and evaluation stages use it).",
    )
    validation_max_rows: int = Field(default=200, ge=1, le=100_000, description="Cap on the validation split.")
    seed: int = Field(default=42, ge=0, description="Seed for sampling, shuffling and the split.")


# ----------------------------------------------------------------------------------------------
# Plain functions (no Prefect)
# ----------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, int | None]:
    m = _SPEC.match(spec.strip())
    if not m or not m.group("source"):
        raise DataError(f"dataset spec {spec!r}: expected SOURCE[#N]")
    n = m.group("n")
    if n is None:
        return m.group("source"), None
    if not n.isdigit() or int(n) <= 0:
        raise DataError(f"dataset spec {spec!r}: #N must be a positive integer, got #{n}")
    return m.group("source"), int(n)


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in {".json", ".jsonl"}


def source_fingerprint(source: str) -> str:
    """What the data content is: a checksum for local files, the id for built-ins and hub ids."""
    if source in BUILTIN:
        return f"{source}@{sha256_file(RESOURCES / 'self_cognition.jsonl')[:12]}"
    if _is_local(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"dataset file not found: {path}")
        return f"{path}@{sha256_file(path)[:16]}"
    return source


def _read_local(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: row {i}: invalid JSON ({e.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows")
    return rows


def _self_cognition(name: str, author: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (RESOURCES / "self_cognition.jsonl").read_text(encoding="utf-8").splitlines()]
    return [
        {"query": r["query"], "response": r["response"].replace("{{NAME}}", name).replace("{{AUTHOR}}", author)}
        for r in rows
    ]


def _arithmetic(seed: int, n: int = 1000) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        rows.append({"query": f"What is {a} {op} {b}?", "response": f"{a} {op} {b} = {value}. The answer is {value}."})
    return rows


def _load_source(source: str, config: DataConfig) -> list[dict[str, Any]]:
    if source == "swift/self-cognition":
        return _self_cognition(config.model_name, config.model_author)
    if source == "tuneline/arithmetic":
        return _arithmetic(config.seed)
    if _is_local(source):
        return _read_local(Path(source).expanduser())
    import datasets  # real hub loading for production runs

    return list(datasets.load_dataset(source, split="train"))


def to_messages(row: dict[str, Any], where: str, system_prompt: str) -> list[dict[str, str]]:
    """One row in any supported format as a list of chat messages."""
    if "messages" in row:
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in row["messages"]]
    elif "instruction" in row and "output" in row:
        prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n{row['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif "query" in row and "response" in row:
        messages = [{"role": "user", "content": row["query"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise DataError(f"{where}: unknown format, fields {sorted(row)}; expected messages, instruction/output or query/response")
    for field in ("role", "content"):
        for i, m in enumerate(messages):
            if not isinstance(m[field], str):
                raise DataError(f"{where}: field messages[{i}].{field} must be a string")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{where}: field output: the conversation must end with a non-empty assistant turn")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def sample(rows: list[Any], n: int | None, rng: random.Random) -> list[Any]:
    """``#N``: without replacement up to the size; above it, whole copies plus a sampled remainder."""
    if n is None:
        return list(rows)
    copies, rest = divmod(n, len(rows))
    return list(rows) * copies + rng.sample(rows, rest)


def prepare(config: DataConfig, out_dir: Path) -> dict[str, Any]:
    """Build the train/validation split in ``out_dir``; return the metrics."""
    parsed = [(spec, *parse_spec(spec)) for spec in config.datasets]
    for _, source, _ in parsed:  # every missing file is reported before anything is read
        if _is_local(source) and not Path(source).expanduser().is_file():
            raise DataError(f"dataset file not found: {Path(source).expanduser()}")
    rng = random.Random(config.seed)
    mixed: list[list[dict[str, str]]] = []
    per_source = []
    for spec, source, n in parsed:
        rows = _load_source(source, config)
        if not rows:
            raise DataError(f"{source}: no rows")
        conversations = [to_messages(r, f"{source}: row {i}", config.system_prompt) for i, r in enumerate(rows)]
        picked = sample(conversations, n, rng)
        mixed.extend(picked)
        per_source.append({"spec": spec, "rows_read": len(rows), "rows_sampled": len(picked)})
    rng.shuffle(mixed)
    n_val = min(config.validation_max_rows, int(len(mixed) * config.validation_ratio))
    if config.validation_ratio > 0:
        n_val = max(n_val, 1)
    if len(mixed) - n_val < 1:
        raise DataError(f"only {len(mixed)} rows after mixing: nothing left to train on")
    validation, train = mixed[:n_val], mixed[n_val:]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("validation", validation)):
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for messages in split:
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    metrics = {"train_rows": len(train), "validation_rows": len(validation), "sources": per_source}
    (out_dir / "report.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    return metrics


# ----------------------------------------------------------------------------------------------
# Prefect task (orchestration side)
# ----------------------------------------------------------------------------------------------
def fingerprint_of(config: DataConfig, root: str, storage_block: str | None = None) -> str:
    sources = [source_fingerprint(parse_spec(spec)[0]) for spec in config.datasets]
    return fingerprint(STAGE, code_version(prepare), config, sources=sources)


@task(name="prepare_dataset", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["cpu"])
def prepare_dataset(config: DataConfig, root: str, storage_block: str | None = None) -> StageRef:
    """Read, sample, mix, validate and split the datasets. CPU only."""
    fp = fingerprint_of(config, root)
    store = store_for(root, storage_block)
    if (ref := store.completed(STAGE, fp)) is not None:
        return ref
    with tempfile.TemporaryDirectory(prefix="tuneline-data-") as tmp:
        metrics = prepare(config, Path(tmp))
        return store.publish(STAGE, fp, Path(tmp), metrics)
