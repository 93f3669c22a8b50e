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


def test_a_prefect_thread_without_the_runs_context_still_sees_the_temporary_server(monkeypatch):
    """Prefect's events worker, restarted in a thread that has no copy of the run's context, reads the
    process-wide settings: they must name the command's temporary server, or that thread starts a second
    one (seen with two runs at once: 25 s lost and an ERROR line at exit)."""
    import threading

    from prefect.settings import get_current_settings

    from flows.cli import _point_prefect_at

    def from_a_fresh_thread() -> str | None:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(get_current_settings().api.url))
        thread.start()
        thread.join()
        return seen[0]

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    before = from_a_fresh_thread()
    _point_prefect_at("http://127.0.0.1:9/api")
    try:
        assert from_a_fresh_thread() == "http://127.0.0.1:9/api"
    finally:
        _point_prefect_at(None)  # as the command's cleanup does
    assert from_a_fresh_thread() == before is None
