"""What a person sees from `tuneline run` on the temporary server: no link to a page that does not exist
(the temporary server has no UI), a pointer to serve-local instead, no ERROR line in a clean run, and at
the end, released or refused by the gate, the result table, a few samples and the release path (or why
there is none). The real command, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.prefect_stack import REPO, tiny_preset

# Cheap generation on the tiny random model: one prompt, a few tokens.
SAMPLES = ["--set", "eval.prompts=['Who are you?']", "--set", "eval.max_new_tokens=6"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """One tiny preset and artifact root for the module: the second run reuses the first's stages."""
    tmp = tmp_path_factory.mktemp("run-output")
    return tiny_preset(tmp / "preset.yaml", tiny_model_dir, tmp / "artifacts"), tmp


def _run(stack, home: str, *sets: str) -> subprocess.CompletedProcess:
    preset, tmp = stack
    env = {**os.environ, "PREFECT_HOME": str(tmp / home)}
    env.pop("PREFECT_API_URL", None)  # the command starts its temporary server
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--preset", str(preset), *sets],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_clean_run_prints_no_dead_link_and_no_error(stack):
    _, tmp = stack
    done = _run(
        stack, "prefect-1", "--set", "release.model_name=2024.10", "--set", "eval.suites=[validation,samples]", *SAMPLES
    )
    out = done.stdout + done.stderr
    print(done.stdout[-3000:])  # what a person saw (pytest -rP shows it)
    assert done.returncode == 0, out[-4000:]
    assert "View at" not in out and "/runs/flow-run/" not in out
    assert "tuneline serve-local" in out
    assert [line for line in out.splitlines() if "ERROR" in line or "Traceback" in line] == []
    # the end of the output: the table, a sample, the gate and where the release is (named as typed: a string)
    end = done.stdout[done.stdout.index("\nmetric ") :]
    assert end.splitlines()[1].split()[0] == "metric" and "Δ vs base [95% CI]" in end
    assert any(line.startswith("validation_loss ") for line in end.splitlines())
    assert "\n  [samples] Who are you?\n    → " in end and "\n    base: " in end
    assert "quality gate: passed" in end
    assert end.rstrip().splitlines()[-1].startswith(f"release: {tmp / 'artifacts' / 'releases' / '2024.10'}/")


def test_a_run_the_gate_refuses_still_ends_with_its_table_samples_and_why_nothing_was_released(stack):
    """A random model never says its name: the identity floor refuses it, after the measurements."""
    suites = ["--set", "eval.suites=[validation,self_cognition,samples]", "--set", "eval.identity_max_new_tokens=6"]
    done = _run(stack, "prefect-2", "--set", "release.model_name=refused", *suites, *SAMPLES)
    out = done.stdout + done.stderr
    print(done.stdout[-3000:], done.stderr[-500:])
    assert done.returncode == 1, out[-4000:]
    end = done.stdout[done.stdout.index("\nmetric ") :]
    assert any(line.startswith("self_cognition_accuracy ") for line in end.splitlines())
    assert "\n  [samples] Who are you?\n" in end and "\n  [self_cognition] " in end
    assert "quality gate: FAILED — " in end and "self_cognition_accuracy" in end
    assert end.rstrip().endswith("release: none — the quality gate refused it (eval.force_release releases anyway)")
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("retrain Failed: ") and "quality gate failed: self_cognition_accuracy" in last
    assert not (stack[1] / "artifacts" / "releases" / "refused").exists()


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
