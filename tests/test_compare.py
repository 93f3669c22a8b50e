"""``tuneline compare`` with real SmolLM2 weights and real releases in a temporary root: two releases that
answer differently side by side, each answer in its own model's column; multi-turn rows answered in
context; greedy and seeded answers the same in a second run (the ``compare`` deployment on a real Prefect
server, whose result is the markdown artifact); a bad prompts file or name fails in one line before
anything is fetched or loaded."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from flows.cli import main as tuneline
from flows.compare import _cell
from tasks.artifacts.store import Store
from tasks.core.models import SMOLLM2_PACKAGE
from tasks.release.stage import publish_release
from tests.prefect_stack import ServeLocal, tiny_preset

MODEL = "compare-model"
SMOL, QUOKKA = "20260101T010000Z-00000001", "20260102T010000Z-00000002"
NAME_Q = "What is your name?"
ROWS = [
    {"id": "name", "prompt": NAME_Q},
    {
        "id": "follow-up",
        "messages": [
            {"role": "user", "content": "My name is Zorblax."},
            {"role": "assistant", "content": "Nice to meet you, Zorblax!"},
            {"role": "user", "content": "What is my name?"},
        ],
    },
]
TOKENS, SEED = 8, 11


def _publish(store: Store, release_id: str, folder: Path, champion: str | None) -> None:
    files = {f"model/{p.name}": p for p in folder.iterdir() if p.is_file()}
    lineage = {
        "base_model": SMOLLM2_PACKAGE,
        "base_revision": "main",
        "gate": {"passed": True, "reasons": []},
        "champion": {"model_name": MODEL, "release_id": champion, "manifest_sha256": "0" * 64} if champion else None,
    }
    publish_release(store, MODEL, release_id, files, lineage)


@pytest.fixture(scope="module")
def releases(tmp_path_factory, smollm2_dir):
    """Two releases of the real SmolLM2 weights: the first as converted, the second (LATEST) with another
    default system prompt in its chat template, so it answers differently. The base is SmolLM2 itself."""
    tmp = tmp_path_factory.mktemp("compare")
    quokka = tmp / "quokka"
    quokka.mkdir()
    for f in smollm2_dir.iterdir():
        if f.suffix == ".safetensors":
            os.link(f, quokka / f.name)  # the same weights, without a second 540 MB copy
        else:
            shutil.copy(f, quokka / f.name)
    template = (quokka / "chat_template.jinja").read_text()
    assert "named SmolLM, trained by Hugging Face" in template
    (quokka / "chat_template.jinja").write_text(
        template.replace("named SmolLM, trained by Hugging Face", "named Quokka, trained by Tuneline")
    )
    store = Store(str(tmp / "root"))
    _publish(store, SMOL, smollm2_dir, None)
    _publish(store, QUOKKA, quokka, SMOL)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    return {"store": store, "prompts": prompts, "folders": {SMOL: smollm2_dir, QUOKKA: quokka}, "tmp": tmp}


def _greedy(folder: Path, question: str) -> str:
    """The expected greedy answer, computed here with plain transformers (not the code under test)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _tables(markdown: str) -> tuple[list[str], list[dict[str, list[str]]]]:
    """Column heads and, per prompt, the greedy and sampled cells of every column, from the markdown."""
    heads, rows = [], []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| | "):
            heads = cells[1:]
            rows.append({})
        elif line.startswith("| greedy |"):
            rows[-1]["greedy"] = cells[1:]
        elif line.startswith("| sampled (seed"):
            rows[-1]["sampled"] = cells[1:]
    return heads, rows


@pytest.fixture(scope="module")
def cli_run(releases):
    out = releases["tmp"] / "compare.md"
    args = ["compare", MODEL, "--root", releases["store"].root, "--releases", f"{SMOL},LATEST"]
    args += ["--prompts", str(releases["prompts"]), "--out", str(out), "--max-new-tokens", str(TOKENS)]
    started = time.monotonic()
    code = tuneline([*args, "--seed", str(SEED)])
    return code, out.read_text() if out.exists() else "", time.monotonic() - started


# ----------------------------------------------------------------------------------------------
def test_two_releases_side_by_side_each_answer_in_its_models_column(releases, cli_run, capsys):
    code, markdown, _ = cli_run
    assert code == 0
    heads, rows = _tables(markdown)
    assert heads == [f"{SMOL} `{SMOL}`", f"LATEST `{QUOKKA}`"]
    assert "every SHA-256 verified" in markdown and f"sampled with seed {SEED}" in markdown
    expected = [_greedy(releases["folders"][rid], NAME_Q) for rid in (SMOL, QUOKKA)]
    assert expected[0] != expected[1]  # the two releases answer differently…
    assert rows[0]["greedy"] == [_cell(e) for e in expected]  # …and each answer stands under its own model
    # the multi-turn row is answered in the context of its earlier turns: only they name Zorblax
    assert all("Zorblax" in cell for cell in rows[1]["greedy"]), rows[1]
    assert "> **assistant:** Nice to meet you, Zorblax!" in markdown


def test_the_terminal_shows_the_table(capsys):
    """Printing only (the answers come from the module's run): a rich table with both models' heads."""
    from flows.compare import print_table

    result = {
        "model_name": MODEL,
        "settings": "greedy",
        "sampling": {"seed": SEED},
        "prompts": [{"id": "name", "messages": [{"role": "user", "content": NAME_Q}]}],
        "columns": [
            {
                "label": "base",
                "release_id": None,
                "base_model": SMOLLM2_PACKAGE,
                "answers": [{"greedy": "[b]x", "sampled": "y"}],
            },
            {"label": "LATEST", "release_id": QUOKKA, "base_model": None, "answers": [{"greedy": "z", "sampled": "w"}]},
        ],
    }
    print_table(result)
    out = capsys.readouterr().out
    assert "LATEST" in out and "[b]x" in out and NAME_Q in out  # a model's "[b]" is text, not markup


@pytest.mark.parametrize(
    "row, field",
    [
        ('{"prompt": ""}', "row 2, field prompt: String should have at least 1 character"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
            "row 2, field messages[1].role: the last turn must be the user's",
        ),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "row 2, field messages[0].role: Input should be"),
        ('{"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}', "row 2, field prompt/messages"),
        ('{"question": "hi"}', "row 2, field question: Extra inputs are not permitted"),
        ('{"prompt": "hi"', "row 2: not JSON"),
    ],
)
def test_a_bad_prompts_file_fails_in_one_line_before_anything_loads(releases, tmp_path, capsys, row, field):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Who are you?"}\n' + row + "\n")
    out = tmp_path / "compare.md"
    code = tuneline(["compare", MODEL, "--root", releases["store"].root, "--prompts", str(bad), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: prompts file {bad}: {field}"), err
    assert len(err.splitlines()) == 1  # nothing fetched or loaded: every progress line would be on stderr
    assert not out.exists()


def test_a_name_that_names_no_release_fails_before_anything_is_fetched(releases, tmp_path, capsys):
    args = ["compare", MODEL, "--root", releases["store"].root, "--prompt", "hi", "--out", str(tmp_path / "c.md")]
    assert tuneline([*args, "--releases", "LATEST,20990101T000000Z-deadbeef"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: 20990101T000000Z-deadbeef: no complete release {MODEL}/20990101T000000Z-deadbeef at "
        f"{releases['store'].where()} (tuneline release list)"
    )
    assert tuneline(["compare", "compare-modle", *args[2:]]) == 1  # a typo: the models the store has
    assert f"no releases of model 'compare-modle' at {releases['store'].where()} (models there: {MODEL})" in (
        capsys.readouterr().err
    )
    assert tuneline([*args, "--prompts", "no-such-prompts"]) == 2
    assert "prompts file no-such-prompts: no such file (shipped prompts: after-retrain)" in capsys.readouterr().err
    assert tuneline([*args[:-1], str(tmp_path / "no-folder" / "c.md")]) == 2  # found before any model answers
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path}/no-folder/c.md: no folder {tmp_path}/no-folder"


def test_the_shipped_prompts_cover_what_teams_ask_after_a_retrain():
    from flows.compare_prompts import gather_prompts

    rows = dict(gather_prompts(None, None))
    assert {"identity", "Cantonese", "multi-turn follow-up", "refusal", "mixed zh/en", "code"} <= set(rows)
    assert len(rows["multi-turn follow-up"]) == 3 and "㗎" in rows["Cantonese"][0]["content"]


def test_the_compare_deployment_gives_the_same_answers_as_a_markdown_artifact(
    releases, cli_run, tmp_path, tiny_model_dir
):
    """A second run, through the UI's deployment on a real Prefect server with a worker: the models asked
    by other names (champion = LATEST, base = SmolLM2 as recorded in the manifest) and in the other order
    give the first run's answers, greedy and seeded, in the artifact ``model-compare``."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, first, _ = cli_run
    _, first_rows = _tables(first)
    preset = tiny_preset(tmp_path / "preset.yaml", tiny_model_dir, tmp_path / "artifacts")
    stack = ServeLocal(tmp_path, preset, workers=["cpu"])
    try:
        stack.wait_ready()
        with SyncPrefectClient(stack.api_url) as client:
            deployment = client.read_deployment_by_name("compare/compare")
            assert deployment.entrypoint == "flows/compare.py:compare" and deployment.work_pool_name == "cpu"
            params = {
                "model_name": MODEL,
                "artifact_root": releases["store"].root,
                "releases": "champion,base",
                "prompts_file": str(releases["prompts"]),
                "max_new_tokens": TOKENS,
                "seed": SEED,
            }
            run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:
                run = client.read_flow_run(run.id)
                if run.state and run.state.is_final():
                    break
                time.sleep(2)
            assert run.state.is_completed(), stack.output()
            (artifact,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
    finally:
        stack.stop()
    assert artifact.key == "model-compare" and artifact.type == "markdown"
    heads, rows = _tables(artifact.data)
    assert heads == [f"champion `{QUOKKA}`", f"base `{SMOLLM2_PACKAGE}`"]
    for mode in ("greedy", "sampled"):
        assert [r[mode] for r in rows] == [r[mode][::-1] for r in first_rows], mode  # same answers, same places
    assert any(r["sampled"] != r["greedy"] for r in rows)  # the sampled answers are sampled
