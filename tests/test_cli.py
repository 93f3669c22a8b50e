"""What `tuneline run` prints at the end: base, champion and tuned side by side, each delta with its
95% interval, the champion named, a few samples, the gate's verdict and the release (or why none)."""

from __future__ import annotations

from flows.results import print_results, run_samples


def _result(champion: dict | None) -> dict:
    row = {"metric": "validation_loss", "base": 3.1, "tuned": 1.2, "delta": -1.9, "interval": "[-2.1, -1.7]"}
    if champion:
        row |= {"champion": 1.1, "delta_champion": 0.1, "interval_champion": "[+0.02, +0.18]"}
    return {
        "table": [row],
        "champion": champion,
        "gate": {"passed": False, "reasons": ["validation_loss +0.1 [+0.02, +0.18] vs champion r1: worse"]},
        "release_uri": "./artifacts/releases/x/r2",
    }


def test_summary_shows_the_champion_column_and_intervals(capsys):
    print_results(_result({"release_id": "r1", "how": "reused"}))
    out = capsys.readouterr().out
    assert "champion" in out.splitlines()[1] and "Δ vs champion [95% CI]" in out
    assert "-1.9000 [-2.1, -1.7]" in out and "+0.1000 [+0.02, +0.18]" in out
    assert "champion: release r1 (reused)" in out and "quality gate: FAILED — validation_loss" in out


def test_first_release_has_no_champion_column(capsys):
    print_results(_result(None))
    out = capsys.readouterr().out
    assert "champion" not in out.splitlines()[1] and "Δ vs base [95% CI]" in out


def test_samples_show_each_suite_that_generated_disagreements_first():
    def row(**kw):
        return {"prompt": "q", "answer": "a", "expects": "x", "correct": False, **kw}

    report = {
        "samples": {"prompts": ["Who are you?", "Hi"], "base": ["I am an AI", "Hello"], "tuned": ["I am Quokka", ""]},
        "details": {
            "self_cognition": {"base": [row(prompt="Your name?")], "tuned": [row(answer="Quokka", correct=True)]},
            "gsm8k": {
                "base": [{"question": "1+1", "completion": "2", "correct": True}] * 2,
                "tuned": [
                    {"question": "1+1", "completion": "2", "correct": True},
                    {"question": "2+2", "completion": "5", "correct": False},
                ],
            },
        },
    }
    picked = run_samples(report)
    assert [(s["suite"], s["prompt"], s["tuned"]) for s in picked] == [
        ("samples", "Who are you?", "I am Quokka"),
        ("self_cognition", "Your name?", "Quokka"),
        ("gsm8k", "1+1", "5"),  # where the two models disagree comes first
    ]
    assert [s["suite"] for s in run_samples(report, limit=5)][3:] == ["samples", "gsm8k"]
    assert run_samples({"details": {}}) == []


def test_a_refused_run_prints_its_samples_and_why_nothing_was_released(capsys):
    result = _result(None) | {
        "release_uri": None,
        "samples": [{"suite": "samples", "prompt": "Hi", "base": "Hello\nthere", "tuned": ""}],
    }
    print_results(result)
    out = capsys.readouterr().out
    assert "  [samples] Hi\n    → (empty)\n    base: Hello there\n" in out
    assert out.rstrip().endswith("release: none — the quality gate refused it (eval.force_release releases anyway)")


def test_auto_on_a_machine_without_gpu_fails_before_a_server_starts_or_a_model_loads(tmp_path):
    """The nightly's `sft.profile: auto` on a worker with no usable GPU: one line naming the task, the
    parameter and what was found; no Prefect server, no model conversion, no artifact written."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "TUNELINE_CACHE": str(tmp_path / "cache"),
        "CUDA_VISIBLE_DEVICES": "GPU-5bd2e6a4-7a3c-2f0e-1e5b-0c2d3e4f5a6b",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "demo", "--set", "sft.profile=auto"]
    cmd += ["--set", f"artifact_root={tmp_path / 'artifacts'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: preflight: lora_sft (sft.profile=auto): profile auto chooses among GPU profiles and found no GPU "
        "(torch sees 0 CUDA devices, CUDA_VISIBLE_DEVICES='GPU-5bd2e6a4"
    )
    assert not (tmp_path / "cache").exists() and not (tmp_path / "artifacts").exists()
    assert not list((tmp_path / "prefect").glob("*.db"))  # no temporary server was started
