"""What a person sees from `tuneline run` on the temporary server: no link to a page that does not exist
(the temporary server has no UI), a pointer to serve-local instead, no ERROR line in a clean run, and the
result table and release path at the end. The real command, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.prefect_stack import REPO, tiny_preset


def test_a_clean_run_prints_no_dead_link_and_no_error(tmp_path, tiny_model_dir):
    preset = tiny_preset(tmp_path / "preset.yaml", tiny_model_dir, tmp_path / "artifacts")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # the command starts its temporary server
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--preset", str(preset), "--set", "release.model_name=2024.10"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "View at" not in out and "/runs/flow-run/" not in out
    assert "tuneline serve-local" in out
    assert [line for line in out.splitlines() if "ERROR" in line or "Traceback" in line] == []
    # the end of the output: the table, the gate and where the release is (named as typed: a string)
    assert "quality gate: passed" in out
    assert f"release: {tmp_path / 'artifacts' / 'releases' / '2024.10'}" in out
