"""Dataset ids as ms-swift names them: its ModelScope ids and the Hugging Face ids it maps them to
(``swift/dataset/dataset/llm.py`` and ``swift/dataset/data/dataset_info.json``), with the row clean-up
its preprocessor applies. A small table for the datasets tuneline's own jobs use; add a row to extend it.

Used by ``tasks.core.hub_sources`` when it reads or fingerprints a hub dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def _strip_zh_input_prefix(row: dict[str, Any]) -> dict[str, Any]:
    """ms-swift's ``AlpacaZhPreprocessor``: an ``input`` starting with ``输入：`` loses those 3 characters.

    >>> _strip_zh_input_prefix({"instruction": "翻译", "input": "输入：猫", "output": "cat"})["input"]
    '猫'
    """
    text = row.get("input")
    if isinstance(text, str) and text.startswith("输入："):
        return {**row, "input": text[3:]}
    return row


@dataclass(frozen=True)
class HubDataset:
    """One dataset under both hubs' ids; ``clean`` is applied to each row as read."""

    modelscope: str
    huggingface: str
    clean: Callable[[dict[str, Any]], dict[str, Any]] | None = None


HUB_DATASETS = [
    HubDataset("AI-ModelScope/alpaca-gpt4-data-zh", "llm-wizard/alpaca-gpt4-data-zh", _strip_zh_input_prefix),
    HubDataset("AI-ModelScope/alpaca-gpt4-data-en", "vicgalle/alpaca-gpt4"),
]


def hub_dataset(source: str) -> HubDataset | None:
    """The table's entry naming ``source`` by either hub's id."""
    return next((d for d in HUB_DATASETS if source in (d.modelscope, d.huggingface)), None)


def hub_id(source: str, hub: str) -> str:
    """The id to ask ``hub`` for: ms-swift's mapping for the datasets in the table, else ``source`` as written.

    >>> hub_id("AI-ModelScope/alpaca-gpt4-data-en", "huggingface"), hub_id("openai/gsm8k", "huggingface")
    ('vicgalle/alpaca-gpt4', 'openai/gsm8k')
    >>> hub_id("vicgalle/alpaca-gpt4", "modelscope")
    'AI-ModelScope/alpaca-gpt4-data-en'
    """
    entry = hub_dataset(source)
    if entry is None:
        return source
    return entry.huggingface if hub == "huggingface" else entry.modelscope
