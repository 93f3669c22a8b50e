"""What `tuneline run` prints at the end: base, champion and tuned side by side, each delta with its
95% interval, the champion named, the gate's verdict."""

from __future__ import annotations

from flows.cli import _print_summary


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
    _print_summary(_result({"release_id": "r1", "how": "reused"}))
    out = capsys.readouterr().out
    assert "champion" in out.splitlines()[1] and "Δ vs champion [95% CI]" in out
    assert "-1.9000 [-2.1, -1.7]" in out and "+0.1000 [+0.02, +0.18]" in out
    assert "champion: release r1 (reused)" in out and "quality gate: FAILED — validation_loss" in out


def test_first_release_has_no_champion_column(capsys):
    _print_summary(_result(None))
    out = capsys.readouterr().out
    assert "champion" not in out.splitlines()[1] and "Δ vs base [95% CI]" in out
