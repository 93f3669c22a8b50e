"""Reading hub datasets (Hugging Face through ``datasets``, ModelScope through its extra) as rows, and
the commit a Hugging Face dataset resolves to (its content, for fingerprints).

Part of the shared source readers (``tasks.core.sources`` is the entry point and re-exports these
names). An id of ms-swift's table is read under its id on the chosen hub (``tasks.core.hub_ids``).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from tasks.core.file_sources import ErrorType, RawRow, SourceError
from tasks.core.hub_ids import hub_dataset, hub_id

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
STREAM_ABOVE = 1 << 30  # bytes of a dataset's files on the hub above which data.streaming "auto" streams

Streaming = Literal["auto", True, False]


def read_hub(
    source: str,
    subset: str | None = None,
    hub: str = "huggingface",
    *,
    name: str | None = None,
    streaming: Streaming = False,
    error: ErrorType = SourceError,
) -> Iterator[RawRow]:
    """The ``train`` split of a hub dataset: Hugging Face through ``datasets``, or ModelScope (extra).
    ``subset``: one config, several joined by ``/`` (concatenated), or ``all`` (every config). An id
    of ms-swift's table is read under its id on ``hub`` (``tasks.core.hub_ids``), with its row clean-up.
    ``streaming`` (Hugging Face only): True reads rows one at a time (``load_dataset(streaming=True)``),
    ``"auto"`` when the dataset is large (``streams``); the rows are the same either way."""
    entry, asked = hub_dataset(source), hub_id(source, hub)
    where = f"{asked} ({hub})" if asked == source else f"{asked} ({hub}; ms-swift's id for {source})"
    parts = [
        _hub_rows(asked, s, hub, where=where, name=name, streaming=streaming, error=error)
        for s in (subset or "").split("/")
    ]
    for i, row in enumerate(row for rows in parts for row in rows):  # one row count across the subsets
        row = dict(row)
        yield RawRow(where, i, entry.clean(row) if entry and entry.clean else row)


def streams(streaming: Streaming, size: int | None) -> bool:
    """Whether a Hugging Face dataset of ``size`` bytes (its files on the hub; None: not known, offline) is
    streamed. ``"auto"`` streams only a large one: a smaller one is downloaded once and kept as the prepared
    Arrow cache that later runs and offline runs (``HF_HUB_OFFLINE``) read, which streaming cannot; a large
    one would need its download and an Arrow copy of it on disk, streaming neither.

    >>> streams("auto", 10 << 30), streams("auto", 10 << 20), streams("auto", None), streams(True, None)
    (True, False, False, True)
    """
    return streaming is True or (streaming == "auto" and (size or 0) > STREAM_ABOVE)


def _hub_rows(
    source: str, subset: str | None, hub: str, *, where: str, name: str | None, streaming: Streaming, error: ErrorType
) -> Iterable[Any]:
    """One subset of a hub dataset as an iterable of rows."""
    subset = subset or None
    if hub == "modelscope":  # read whole, as before: its streaming mode is not wired up
        try:
            from modelscope import MsDataset
        except ImportError:
            raise error(
                f"{where}: ModelScope datasets need the modelscope extra: pip install 'tuneline[modelscope]'"
            ) from None
        try:
            return MsDataset.load(source, subset_name=subset or "default", split="train").to_hf_dataset()
        except Exception as e:
            raise error(f"{where}: cannot load ({type(e).__name__}: {str(e)[:300]})") from None
    import datasets

    size = None
    if not any(os.environ.get(v) for v in OFFLINE_VARIABLES):
        try:  # a quick probe: an unreachable hub makes load_dataset retry for a minute
            from huggingface_hub import HfApi

            info = HfApi().dataset_info(source, timeout=10, files_metadata=streaming == "auto")
            size = sum(f.size or 0 for f in info.siblings or []) if streaming == "auto" else None
        except Exception as e:
            raise error(
                f"{where}: cannot reach the dataset on the hub ({type(e).__name__}: {str(e)[:200]}); "
                "set HF_HUB_OFFLINE=1 to use the local cache"
            ) from None
    stream = streams(streaming, size)
    try:
        # subset "all": every config of the dataset (ms-swift: every registered subset)
        configs = datasets.get_dataset_config_names(source) if subset == "all" else [subset]
        loaded = [datasets.load_dataset(source, c, split="train", streaming=stream) for c in configs]
    except Exception as e:  # missing subset, unknown id, no network: all end the same way, with the reason
        raise error(f"{where}: cannot load {name or source!r} ({type(e).__name__}: {str(e)[:300]})") from None
    rows = itertools.chain.from_iterable(loaded)
    return _streamed(rows, where, name or source, error) if stream else rows


def _streamed(rows: Iterable[Any], where: str, name: str, error: ErrorType) -> Iterator[Any]:
    """A streamed dataset's rows: its files are fetched and parsed while iterating, so their errors
    surface here, and end as the caller's error."""
    try:
        yield from rows
    except Exception as e:
        raise error(f"{where}: cannot read {name!r} while streaming ({type(e).__name__}: {str(e)[:300]})") from None


def hub_dataset_revision(source: str, revision: str = "main") -> str | None:
    """The commit a hub dataset's revision names: asked of the hub; offline (or the hub unreachable)
    the commit this machine last downloaded (the hub cache's ref, else the newest ``datasets`` cache
    folder, named by commit — the one ``load_dataset`` will read offline). None when neither is known:
    then loading fails too, and says why."""
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)
    if not offline:
        try:
            from huggingface_hub import HfApi

            return HfApi().dataset_info(source, revision=revision, timeout=10).sha
        except Exception:  # unreachable, or unknown: the cache below, else None (loading reports it)
            pass
    try:
        from huggingface_hub import try_to_load_from_cache

        card = try_to_load_from_cache(source, "README.md", revision=revision, repo_type="dataset")
        if isinstance(card, str):
            return Path(card).parent.name  # .../snapshots/<commit>/README.md
        from datasets import config as datasets_config

        folder = Path(datasets_config.HF_DATASETS_CACHE) / "___".join(source.split("/"))
        cached = sorted((p for p in folder.glob("*/*/*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        return f"cached:{cached[-1].name}" if cached else None
    except Exception:  # a malformed id: loading reports it
        return None
