"""The docs' commands still work: every fenced block marked ```` ```bash runnable ```` in README.md and
docs/operating.md runs here, in bash from the repository root (``set -e``: any failing line fails the
test, with the block's output). Mark only commands that run on CPU in seconds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/operating.md")
BLOCK = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for n, match in enumerate(BLOCK.finditer(text), 1):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{doc}:{line}", match.group(1)))
    return found


def test_the_docs_mark_commands_runnable():
    assert {where.split(":")[0] for where, _ in runnable_blocks()} == set(DOCS)


@pytest.mark.parametrize("where, script", runnable_blocks(), ids=[w for w, _ in runnable_blocks()])
def test_a_runnable_block_of_the_docs_runs(where, script, tmp_path):
    # `tuneline` is this checkout's CLI under this interpreter (an installed console script may be another's)
    prelude = (
        f'set -e\ntuneline() {{ "{sys.executable}" -m flows.cli "$@"; }}\npython() {{ "{sys.executable}" "$@"; }}\n'
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        ["bash", "-c", prelude + script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (
        f"{where}: exit {done.returncode}\n{script}\n---\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
