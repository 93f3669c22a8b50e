"""The champion in the evaluation stage: the measurement key that says when two evaluations measured the
same thing, and how the champion's per-item results are obtained — reused from its release's report
when the measurement matches, else measured again on its merged model (``tasks/artifacts/registry.py`` reads the
release; the flow decides which release is the champion).

The measurement key hashes everything that decides the per-item numbers: the evaluation config
without the verdict-only settings (tolerances, floor, gating metrics, ``force_release``), the code
that measures (every project module the evaluation stage reaches — the stage itself, data, suites,
engines, HumanEval, answer matching, the sandbox, chat templates — less ``VERDICT_ONLY``: the gate,
its statistics, the report's wording), the evaluation stack, the
evaluation data's content, the validation rows (the data stage's digest), the system prompt, name
and author, the engine and the device. It is stored in
``report.json`` as ``measurement``, so tomorrow's night can tell whether tonight's numbers still apply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tasks.artifacts.registry import (
    ChampionRef,
    RegistryError,
    champion_report,
    download_champion_model,
    release_prefix,
)
from tasks.artifacts.store import Store, local_cache_dir
from tasks.core.fingerprints import code_modules, stack_versions
from tasks.evaluate.data import data_fingerprints
from tasks.evaluate.engines import select_engine
from tasks.evaluate.params import GATE_ONLY, EvalParams

#: Where the evaluation's code starts: every project module it reaches decides how an item is measured
#: (prompting, generation, scoring) unless it is named in ``VERDICT_ONLY``. Counting by reach, not by a
#: list of measuring modules, means a module added later — or a change in ``stage.py`` itself, such as
#: how the system prompt reaches generation — counts until someone shows it decides no number.
STAGE_MODULE = "tasks.evaluate.stage"
#: Modules the stage reaches that decide the verdict or which numbers are reused, not an item's number:
#: the gate and its statistics, the report's wording, the champion's handling (this module: a change to
#: what the key hashes changes the keys by itself) and the release registry it reads champions from.
VERDICT_ONLY = {
    "tasks.evaluate.gate": "decides the verdict",
    "tasks.evaluate.stats": "decides the verdict",
    "tasks.evaluate.report": "words the report",
    "tasks.evaluate.champion": "names measurements",
    "tasks.artifacts.registry": "reads releases",
}


def measuring_code(root: Path | None = None) -> str:
    """16 hex digits over the normalised code of every module ``STAGE_MODULE`` reaches, less
    ``VERDICT_ONLY`` and the byte-moving modules that count in no fingerprint.

    >>> measuring_code() == measuring_code() and len(measuring_code()) == 16
    True
    """
    counted = {
        name: digest
        for name, digest in code_modules(STAGE_MODULE, root).items()
        if name not in VERDICT_ONLY and digest != "not counted"
    }
    return hashlib.sha256(json.dumps(counted, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that can change a result (the evaluation stack).

    >>> {"torch", "transformers"} <= set(library_versions())
    True
    """
    return stack_versions("evaluation")


def device_kind() -> str:
    """``cpu``, or ``cuda:<GPU name>``: kernels and dtypes differ by device, and so can greedy answers."""
    import torch

    return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"


def measurement_key(
    config: EvalParams,
    dataset_content: str | None,
    system_prompt: str,
    name: str,
    author: str,
    storage_block: str | None = None,
) -> str:
    """SHA-256 of everything that decides the per-item numbers (see the module docstring).
    ``dataset_content``: the data stage's digest (``tasks.core.fingerprints.content_of``)."""
    payload = {
        "config": config.model_dump(mode="json", exclude=set(GATE_ONLY)),
        "code": measuring_code(),
        "libraries": library_versions(),
        "data": data_fingerprints(config, storage_block),
        "validation_rows": dataset_content if "validation" in config.suites else None,
        "system_prompt": system_prompt,
        "name": name,
        "author": author,
        "engine": select_engine(config.engine),
        "device": device_kind(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class ChampionInput:
    """The champion as ``evaluate_models`` takes it: reused results, or a model folder to evaluate."""

    ref: ChampionRef
    how: Literal["reused", "evaluated"]
    why: str
    model_dir: str | None = None
    items: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def release_id(self) -> str:
        return self.ref.release_id

    def summary(self) -> dict[str, str]:
        """What the report (and so the release manifest) records: the champion's ref (model name,
        release id, manifest digest: enough to rebuild the ``ChampionRef``), ``how`` and ``why``."""
        return {**self.ref.model_dump(), "how": self.how, "why": self.why}


def _not_reusable(report: dict[str, Any] | None, measurement: str) -> str | None:
    """Why the champion's own results cannot stand in for a measurement now; None when they can."""
    if report is None:
        return "its release has no eval/report.json"
    if not report.get("measurement"):
        return "its report has no measurement key (made before per-item results)"
    if report["measurement"] != measurement:
        return "its evaluation measured differently (evaluation data, code, libraries, device or config changed)"
    if not (report.get("items") or {}).get("tuned"):
        return "its report has no per-item results"
    return None


def prepare_champion(store: Store, champion: ChampionRef, measurement: str, cache: Path | None = None) -> ChampionInput:
    """The champion's (or the anchor's: any release) per-item results from its release when its report
    matches its manifest's SHA-256 and was measured exactly as tonight's (same ``measurement``);
    otherwise its merged model, downloaded and checked against its manifest, to be run through the
    suites as another model."""
    try:  # verified against the manifest's SHA-256 first; a report that fails it is never reused
        report = champion_report(store, champion)
        why = _not_reusable(report, measurement)
    except RegistryError as e:
        report, why = None, str(e)
    if why is None:
        assert report is not None
        details = {suite: d["tuned"] for suite, d in (report.get("details") or {}).items() if d and "tuned" in d}
        samples = (report.get("samples") or {}).get("tuned")
        if samples is not None:
            details["samples"] = samples
        return ChampionInput(
            champion,
            "reused",
            "measured exactly as tonight (same measurement key)",
            items=report["items"]["tuned"],
            details=details,
        )
    dest = (cache or local_cache_dir() / "champions") / release_prefix(champion.model_name, champion.release_id)
    model_dir = download_champion_model(store, champion, dest)
    return ChampionInput(champion, "evaluated", why, model_dir=str(model_dir))
