"""Reading hub datasets (Hugging Face through ``datasets``, ModelScope through its extra) as rows, and
the commit a Hugging Face dataset resolves to (its content, for fingerprints).

Part of the shared source readers (``tasks.core.sources`` is the entry point and re-exports these
names). An id of ms-swift's table is read under its id on the chosen hub (``tasks.core.hub_ids``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from tasks.core.file_sources import ErrorType, RawRow, SourceError
from tasks.core.hub_ids import hub_dataset, hub_id

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def read_hub(
    source: str,
    subset: str | None = None,
    hub: str = "huggingface",
    *,
    name: str | None = None,
    error: ErrorType = SourceError,
) -> Iterator[RawRow]:
    """The ``train`` split of a hub dataset: Hugging Face through ``datasets``, or ModelScope (extra).
    ``subset``: one config, several joined by ``/`` (concatenated), or ``all`` (every config). An id
    of ms-swift's table is read under its id on ``hub`` (``tasks.core.hub_ids``), with its row clean-up."""
    entry, asked = hub_dataset(source), hub_id(source, hub)
    where = f"{asked} ({hub})" if asked == source else f"{asked} ({hub}; ms-swift's id for {source})"
    parts = [_hub_rows(asked, s, hub, where=where, name=name, error=error) for s in (subset or "").split("/")]
    for i, row in enumerate(row for rows in parts for row in rows):  # one row count across the subsets
        row = dict(row)
        yield RawRow(where, i, entry.clean(row) if entry and entry.clean else row)


def _hub_rows(source: str, subset: str | None, hub: str, *, where: str, name: str | None, error: ErrorType) -> Any:
    """One subset of a hub dataset as an iterable of rows."""
    subset = subset or None
    if hub == "modelscope":
        try:
            from modelscope import MsDataset
        except ImportError:
            raise error(
                f"{where}: ModelScope datasets need the modelscope extra: pip install 'tuneline[modelscope]'"
            ) from None
        try:
            rows = MsDataset.load(source, subset_name=subset or "default", split="train").to_hf_dataset()
        except Exception as e:
            raise error(f"{where}: cannot load ({type(e).__name__}: {str(e)[:300]})") from None
    else:
        import os

        import datasets

        if not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")):
            try:  # a quick probe: an unreachable hub makes load_dataset retry for a minute
                from huggingface_hub import HfApi

                HfApi().dataset_info(source, timeout=10)
            except Exception as e:
                raise error(
                    f"{where}: cannot reach the dataset on the hub ({type(e).__name__}: {str(e)[:200]}); "
                    "set HF_HUB_OFFLINE=1 to use the local cache"
                ) from None
        try:
            if subset == "all":  # every config of the dataset (ms-swift: every registered subset)
                configs = datasets.get_dataset_config_names(source)
                return [row for c in configs for row in datasets.load_dataset(source, c, split="train")]
            rows = datasets.load_dataset(source, subset, split="train")
        except Exception as e:  # missing subset, unknown id, no network: all end the same way, with the reason
            raise error(f"{where}: cannot load {name or source!r} ({type(e).__name__}: {str(e)[:300]})") from None
    return rows


def hub_dataset_revision(source: str, revision: str = "main") -> str | None:
    """The commit a hub dataset's revision names: asked of the hub; offline (or the hub unreachable)
    the commit this machine last downloaded (the hub cache's ref, else the newest ``datasets`` cache
    folder, named by commit — the one ``load_dataset`` will read offline). None when neither is known:
    then loading fails too, and says why."""
    import os

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
