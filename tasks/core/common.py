"""Small pieces every stage uses, in one place: the Prefect shim, dtype names, tokenizer loading,
and picture/markdown artifacts.

Kept free of heavy imports at module level (torch, transformers, prefect are imported inside the
functions), so a training child on a GPU box that lacks Prefect can still import a stage module.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Literal

Dtype = Literal["fp32", "fp16", "bf16"]

try:
    from prefect import task
except ModuleNotFoundError:  # a GPU worker (or the vLLM venv) runs only the plain functions and may lack Prefect

    def task(*_args: Any, **_kwargs: Any) -> Any:  # type: ignore[no-redef]
        """Without Prefect a stage's task is its plain function."""
        return lambda fn: fn


def torch_dtype(name: str) -> Any:
    """The torch dtype for one of our dtype names.

    >>> str(torch_dtype("bf16"))
    'torch.bfloat16'
    """
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model's tokenizer, with a pad token: batching needs one, and many chat models ship none
    (the end-of-sequence token stands in; the attention mask hides it where it pads)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def picture_markdown(png: Path, alt: str) -> str:
    """A PNG inlined as markdown (Prefect artifacts cannot link local files); empty when missing."""
    if not png.exists():
        return ""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})\n\n"


def metrics_markdown(metrics: dict[str, Any], keys: list[str] | None = None) -> str:
    """A two-column markdown table of metrics (floats to four significant digits).

    >>> print(metrics_markdown({"loss": 0.123456, "steps": 5}))
    | metric | value |
    |---|---|
    | loss | 0.1235 |
    | steps | 5 |
    """
    rows = [(k, metrics.get(k)) for k in keys] if keys else list(metrics.items())
    lines = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    return "| metric | value |\n|---|---|\n" + "\n".join(lines)


def _in_prefect_run() -> bool:
    """Inside a flow or task run. Checked first: outside one, Prefect would start a temporary server
    just to store an artifact that no run shows."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None
    except ModuleNotFoundError:
        return False


def publish_markdown(key: str, markdown: str, description: str) -> bool:
    """A Prefect markdown artifact; False (and nothing raised) outside a Prefect run, where a plain
    call of a stage has nowhere to report."""
    if not _in_prefect_run():
        return False
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=key, markdown=markdown, description=description)
        return True
    except Exception:  # noqa: BLE001 - no run context, or no Prefect at all
        return False


def publish_table(key: str, table: list[dict[str, Any]], description: str) -> bool:
    """A Prefect table artifact; False outside a Prefect run (see ``publish_markdown``)."""
    if not _in_prefect_run():
        return False
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=key, table=table, description=description)
        return True
    except Exception:  # noqa: BLE001 - no run context, or no Prefect at all
        return False


class ProgressReporter:
    """Mirror a training child's ``progress.jsonl`` (one JSON line per logging step, with ``step``
    and ``max_steps``) into a Prefect progress artifact, at most every few seconds."""

    def __init__(self, path: Path, key: str, description: str):
        self.path, self.key, self.description = path, key, description
        self.artifact_id: Any = None
        self.last = 0.0

    def update(self, force: bool = False) -> None:
        import json
        import time

        if not force and time.monotonic() - self.last < 3:
            return
        self.last = time.monotonic()
        if not self.path.exists():
            return
        lines = self.path.read_text().strip().splitlines()
        if not lines:
            return
        last = json.loads(lines[-1])
        percent = 100.0 * last["step"] / max(1, last.get("max_steps") or 1)
        if not _in_prefect_run():
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    progress=percent, key=self.key, description=self.description
                )
            else:
                update_progress_artifact(self.artifact_id, progress=percent)
        except Exception:  # noqa: BLE001 - outside a Prefect run (plain call) there is nowhere to report
            pass

    def finish(self) -> None:
        self.update(force=True)


def run_logger() -> Any:
    """Prefect's run logger inside a run, else the ``tuneline`` stdlib logger (plain calls)."""
    import logging

    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError, or no Prefect
        return logging.getLogger("tuneline")
