"""Train/validation split (tasks/data/split.py, through ``prepare`` and ``tuneline data check``): no prompt on
both sides, with or without #N repeats; a row keeps its side from night to night; user validation sets.

Offline: the built-in sets, ../shared/data stand-ins for the reference job's hub sources, crafted files.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tasks.core.sources import read_builtin
from tasks.data import DataError, DataParams, parse_spec, prepare
from tasks.data.split import position, prompt_key, prompt_text, split_rows


def _rows(out: Path, split: str = "train") -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(out: Path, datasets: list[str], **kw) -> dict:
    kw.setdefault("system_prompt", "")
    kw.setdefault("max_length", None)
    return prepare(DataParams(datasets=datasets, **kw), out)


def _user_turns(messages) -> tuple[str, ...]:
    return tuple(m["content"] for m in messages if m["role"] == "user")


def _assert_held_out(metrics: dict, out: Path) -> None:
    """No prompt in both written splits: as the report counts it, normalised, and as raw text."""
    train, validation = _rows(out), _rows(out, "validation")
    assert validation and len(validation) == metrics["validation_rows"] and len(train) == metrics["train_rows"]
    assert metrics["train_validation_prompt_overlap"] == 0
    assert not {prompt_key(m) for m in train} & {prompt_key(m) for m in validation}
    assert not {_user_turns(m) for m in train} & {_user_turns(m) for m in validation}


# ----------------------------------------------------------------------------------------------
# Done when: `tuneline data check` reports 0 shared prompts, on the demo preset and the reference job
# ----------------------------------------------------------------------------------------------
def test_demo_preset_shares_no_prompt(tmp_path, capsys):
    from flows.cli import main

    assert main(["data", "check", "--preset", "demo", "--out", str(tmp_path)]) == 0
    assert "train/validation prompt overlap: 0 prompts" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "report.json").read_text())
    _assert_held_out(metrics, tmp_path)
    # #240 and #80 are drawn from the training prompts only; validation is on top, capped at the preset's 32
    # (before: 32 of the 320 sampled rows, 22 of them exact copies of training rows).
    assert (metrics["train_rows"], metrics["validation_rows"]) == (320, 32)
    assert [s["rows_validation"] > 0 for s in metrics["sources"]] == [True, True]


def test_reference_job_specs_share_no_prompt(tmp_path, shared_data, capsys):
    from flows.cli import main

    # The reference job's specs (DataParams' defaults) are hub ids, unreachable here: the offline stand-ins,
    # with the same #N (self-cognition's 145 rows are repeated to make 500).
    assert [parse_spec(s).n for s in DataParams().datasets] == [500, 500, 500]
    specs = [
        f"{shared_data}/alpaca/alpaca_zh_demo.json#500",
        f"{shared_data}/alpaca/alpaca_en_demo.json#500",
        "swift/self-cognition#500",
    ]
    assert main(["data", "check", *specs, "--out", str(tmp_path)]) == 0
    assert "train/validation prompt overlap: 0 prompts" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "report.json").read_text())
    _assert_held_out(metrics, tmp_path)
    assert metrics["train_rows"] == 1500 and all(s["rows_validation"] > 0 for s in metrics["sources"])
    assert [s["duplicates"] for s in metrics["sources"]] == [8, 14, 0]


def test_repeats_of_two_built_in_sets_share_no_prompt(tmp_path):
    metrics = _run(tmp_path, ["swift/self-cognition#500", "tuneline/arithmetic#500"], validation_ratio=0.05)
    _assert_held_out(metrics, tmp_path)
    assert metrics["sources"][1]["duplicates"] == 13  # 1,000 generated questions, 13 of them twice


# ----------------------------------------------------------------------------------------------
# How the split is made
# ----------------------------------------------------------------------------------------------
def test_a_row_keeps_its_side_when_other_sources_n_and_seed_change(tmp_path, shared_data):
    tonight = _run(
        tmp_path / "a", ["swift/self-cognition#240", "tuneline/arithmetic#80"], validation_ratio=0.1, seed=42
    )
    tomorrow = _run(
        tmp_path / "b",
        ["swift/self-cognition#60", f"{shared_data}/self-cognition/identity.json#30"],
        validation_ratio=0.1,
        seed=7,
    )
    assert tonight["validation_rows"] < 200 and tomorrow["validation_rows"] < 200  # under the cap: nothing left out
    ours = {prompt_key([{"role": "user", "content": r.row["query"]}]) for r in read_builtin("swift/self-cognition")}

    def sides(out: Path) -> tuple[set[str], set[str]]:
        train, validation = ({prompt_key(m) for m in _rows(out, s)} & ours for s in ("train", "validation"))
        return train, validation

    train_a, val_a = sides(tmp_path / "a")
    train_b, val_b = sides(tmp_path / "b")
    assert val_a and val_a == val_b  # the same self-cognition prompts held out, every row of them
    assert not train_a & val_b and not train_b & val_a


def test_duplicates_dropped_and_one_prompt_one_side(tmp_path):
    rows = [{"query": f"Question {i}?", "response": f"Answer {i}{v}."} for i in range(40) for v in "abc"]
    rows += [{"query": "  question 3?", "response": "ANSWER 3a."}, {"query": "Question 3?", "response": "Answer 3a."}]
    data = _write_jsonl(tmp_path / "qa.jsonl", rows)
    metrics = _run(tmp_path / "out", [str(data)], validation_ratio=0.2)
    assert metrics["sources"][0]["duplicates"] == 2  # the same conversation once normalised, and an exact copy
    side = defaultdict(set)
    for split in ("train", "validation"):
        for m in _rows(tmp_path / "out", split):
            side[prompt_key(m)].add(split)
    assert len(side) == 40 and all(len(s) == 1 for s in side.values())  # three answers, one side
    assert 0 < sum("validation" in s for s in side.values()) < 40
    assert metrics["train_rows"] + metrics["validation_rows"] == 120


def test_at_least_one_validation_row_per_source(tmp_path):
    files, smallest = [], []
    for name in ("a", "b", "c"):
        prompts = [f"{name} prompt {i}" for i in range(5)]
        # no prompt hashes under the ratio: the fallback decides
        assert min(position(prompt_text(p)) for p in prompts) >= 0.01
        files.append(str(_write_jsonl(tmp_path / f"{name}.jsonl", [{"query": p, "response": "ok"} for p in prompts])))
        smallest.append(min(prompts, key=lambda p: position(prompt_text(p))))
    lone = _write_jsonl(tmp_path / "lone.jsonl", [{"query": "only me", "response": f"v{i}"} for i in range(3)])
    assert position(prompt_text("only me")) >= 0.01
    metrics = _run(tmp_path / "out", [*files, str(lone)], validation_ratio=0.01)
    assert [s["rows_validation"] for s in metrics["sources"]] == [1, 1, 1, 0]  # a single prompt stays in train
    assert [s["rows_kept"] for s in metrics["sources"]] == [4, 4, 4, 3]
    assert sorted(m[0]["content"] for m in _rows(tmp_path / "out", "validation")) == sorted(smallest)


def test_the_cap_leaves_extra_validation_rows_unused_not_trained(tmp_path):
    rows = [{"query": f"Q{i}?", "response": f"A{i}."} for i in range(300)]
    data = _write_jsonl(tmp_path / "qa.jsonl", rows)
    metrics = _run(tmp_path / "out", [str(data)], validation_ratio=0.2, validation_max_rows=10)
    messages = [
        [{"role": "user", "content": r["query"]}, {"role": "assistant", "content": r["response"]}] for r in rows
    ]
    train, held = split_rows(messages, 0.2)
    assert len(held) > 10 and metrics["validation_rows"] == 10 and metrics["train_rows"] == len(train)
    validation = _rows(tmp_path / "out", "validation")
    assert sorted(position(prompt_key(m)) for m in held)[:10] == [position(prompt_key(m)) for m in validation]


# ----------------------------------------------------------------------------------------------
# A user-supplied validation set (data.validation_datasets)
# ----------------------------------------------------------------------------------------------
def test_validation_datasets_are_the_validation_split_and_leave_train(tmp_path):
    from tasks.core.stage import StageContext
    from tasks.data import fingerprint_of

    train = _write_jsonl(tmp_path / "train.jsonl", [{"query": f"q{i}?", "response": f"a{i}."} for i in range(20)])
    mine = [
        {"query": " Q3? ", "response": "three"},
        {"query": "q5?", "response": "five"},
        {"query": "q7?", "response": "seven"},
        {"query": "something new?", "response": "new"},
        {"query": "q5?", "response": "five"},  # a duplicate: counted once
    ]
    held = _write_jsonl(tmp_path / "held.jsonl", mine)
    out = tmp_path / "out"
    metrics = _run(out, [str(train)], validation_datasets=[str(held)], validation_ratio=0.3)  # the ratio is ignored
    _assert_held_out(metrics, out)
    assert sorted(m[-1]["content"] for m in _rows(out, "validation")) == ["five", "new", "seven", "three"]
    assert metrics["train_rows"] == 17 and metrics["removed_for_validation"] == 3
    own, theirs = metrics["sources"]
    assert (own["role"], own["removed_for_validation"], own["rows_validation"]) == ("train", 3, 0)
    assert (theirs["role"], theirs["duplicates"], theirs["rows_validation"]) == ("validation", 1, 4)
    assert metrics["validation_from"] == "data.validation_datasets"
    assert "held.jsonl (validation)" in (out / "report.md").read_text()

    # #N on a validation set: N rows, no repeats, chosen by hash (not the seed); only their prompts leave train.
    metrics = _run(tmp_path / "n", [str(train)], validation_datasets=[f"{held}#2"], seed=3)
    assert metrics["validation_rows"] == 2 and metrics["train_rows"] == 20 - metrics["removed_for_validation"]
    again = _run(tmp_path / "n2", [str(train)], validation_datasets=[f"{held}#2"], seed=4)
    assert _rows(tmp_path / "n", "validation") == _rows(tmp_path / "n2", "validation")

    # The stage's cache key follows the validation set's content.
    ctx = StageContext(base_model="Qwen/Qwen2-7B-Instruct", root=str(tmp_path))
    config = DataParams(datasets=[str(train)], validation_datasets=[str(held)])
    before = fingerprint_of(config, ctx)
    _write_jsonl(held, mine[:2])
    assert fingerprint_of(config, ctx) != before and again["train_validation_prompt_overlap"] == 0


def test_a_validation_spec_naming_no_rows_is_a_clear_error(tmp_path, monkeypatch):
    import tasks.data.mix

    def no_tokenizer(*_args, **_kw):
        raise AssertionError("the tokenizer was loaded before the bad validation spec was reported")

    monkeypatch.setattr(tasks.data.mix, "load_tokenizer", no_tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "nothing").mkdir()
    cases = {
        "empty.jsonl": r"^data\.validation_datasets: .*empty\.jsonl: the source has no rows$",
        "empty.json": r"^data\.validation_datasets: .*empty\.json: the source has no rows$",
        "nothing": r"^data\.validation_datasets: dataset folder .*nothing holds no .* file$",
        "missing.jsonl": r"^data\.validation_datasets: dataset file not found: .*missing\.jsonl \(spec '.*'\)$",
    }
    for name, message in cases.items():
        # A hub source to train on, unreachable here: the local validation set is reported first, fast.
        config = DataParams(
            datasets=["AI-ModelScope/alpaca-gpt4-data-en#5"], validation_datasets=[str(tmp_path / name)]
        )
        with pytest.raises(DataError, match=message) as e:
            prepare(config, tmp_path / "out")
        assert "\n" not in str(e.value)
