"""Re-fingerprinting a 15 GB local model folder: the first identity reads every byte, the second only
stats the files (their digests are remembered under ``$TUNELINE_CACHE/digests/``). Target: the second
under 1 s.

The folder is generated: sparse weight files (``truncate``: no disk used, read back as zeros at memory
speed, so the first figure is the hashing cost, not the disk's) plus a config and a tokenizer file.

    .venv/bin/python bench/model_digest.py                 # 15 GB in 4 shards
    .venv/bin/python bench/model_digest.py --gb 30 --shards 8
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from tasks.core.models import model_identity


def make_model(folder: Path, gb: float, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 4096}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    size = int(gb * 1e9 / shards)
    for i in range(shards):
        with open(folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            f.truncate(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=15.0)
    parser.add_argument("--shards", type=int, default=4)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneline-bench-digest-") as tmp:
        os.environ["TUNELINE_CACHE"] = f"{tmp}/cache"  # a cold digest cache
        model = Path(tmp) / "model"
        make_model(model, ns.gb, ns.shards)
        times, identities = [], []
        for _ in range(3):
            start = time.perf_counter()
            identities.append(model_identity(str(model)))
            times.append(time.perf_counter() - start)
        assert len(set(identities)) == 1
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}")
    print(f"model folder: {ns.gb:g} GB in {ns.shards} sparse shards + config + tokenizer -> {identities[0]}")
    print(f"{'identity':<34}{'wall s':>10}")
    print(f"{'first (reads every byte)':<34}{times[0]:>10.2f}")
    print(f"{'second (digests remembered)':<34}{times[1]:>10.4f}")
    print(f"{'third':<34}{times[2]:>10.4f}")


if __name__ == "__main__":
    main()
