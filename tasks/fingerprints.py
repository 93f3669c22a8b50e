"""A stage's identity: the fingerprint that is its cache key, its folder name and its lineage.

Fingerprint = hash(stage name, the code the stage runs, its config, the fingerprints of its
upstream stages, the content digests of its source data) — docs/design.md, "Contracts between
stages". Kept apart from the artifact store: the store keeps folders, this module names them.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def code_version(obj: Any) -> str:
    """Hash of the source of the module that defines ``obj``: editing a stage's code reruns it.

    Read once per process and module, so it describes the code that is running even if the file
    changes on disk afterwards."""
    module = inspect.getmodule(obj)
    return _module_hash(module.__name__) if module else hashlib.sha256(repr(obj).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _module_hash(name: str) -> str:
    import sys

    return hashlib.sha256(inspect.getsource(sys.modules[name]).encode()).hexdigest()[:12]


def fingerprint(stage: str, code: str, config: Any, upstream: Iterable[str] = (), sources: Iterable[str] = ()) -> str:
    payload = json.dumps(
        {
            "stage": stage,
            "code": code,
            "config": _canonical(config),
            "upstream": list(upstream),
            "sources": list(sources),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
