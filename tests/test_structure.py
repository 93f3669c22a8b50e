"""The layout promises of docs/design.md, checked: small modules that say what they are for, stages
that never import each other, one stage skeleton, and parameters declared once (params model → CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.params import RetrainParams, load_params
from tasks.artifacts.tracking import TrackingTarget
from tasks.core.stage import StageContext, Workspace, run_stage

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "blocks")
MAX_LINES = 500
MAX_TASKS_ENTRIES = 10
# The stage packages: each may import the plumbing, never another stage.
STAGES = {"data", "sft", "grpo", "merge", "evaluate", "release"}
# The plumbing under them, grouped by concern: it never imports a stage.
PLUMBING = {"artifacts", "runtime", "core"}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in _modules()}


def _imports(name: str) -> set[str]:
    """The project modules one module imports, anywhere in the file (inside functions too: they run);
    ``from pkg import x`` counts as ``pkg.x`` when that is a module, else as ``pkg``."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    found.add(f"{base}.{alias.name}")
                elif base in MODULES:
                    found.add(base)
    return found - {name}


IMPORTS = {name: _imports(name) for name in MODULES}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_is_small_and_says_what_it_is_for(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"{path.relative_to(REPO)} has {len(lines)} lines (limit {MAX_LINES}): split it"
    doc = ast.get_docstring(ast.parse("\n".join(lines)))
    assert doc and len(doc.split()) >= 5, f"{path.relative_to(REPO)}: the first lines must say what it is for"


def test_tasks_is_a_handful_of_packages_grouped_by_concern():
    entries = sorted(p.name for p in (REPO / "tasks").iterdir() if p.name != "__pycache__")
    assert len(entries) <= MAX_TASKS_ENTRIES, f"tasks/ has {len(entries)} entries: {entries}"
    packages = {p.name for p in (REPO / "tasks").iterdir() if (p / "__init__.py").is_file()}
    assert packages == STAGES | PLUMBING, "every folder under tasks/ is a stage or a plumbing package"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                cycles.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_anywhere():
    assert _cycles(IMPORTS) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _group(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "tasks" and len(parts) > 1 else None


def test_no_stage_imports_another_stage_and_plumbing_imports_none():
    offenders = []
    for name, imported in sorted(IMPORTS.items()):
        mine = _group(name)
        stages = {g for g in map(_group, imported) if g in STAGES} - {mine}
        if stages and mine in STAGES:
            offenders.append(f"{name} (stage {mine}) imports stage {sorted(stages)}")
        elif stages and (mine in PLUMBING or name == "tasks" or name.startswith("blocks")):
            offenders.append(f"{name} (plumbing) imports stage {sorted(stages)}")
    assert not offenders, offenders


# -- the skeleton ------------------------------------------------------------------------------
def test_run_stage_builds_once_then_serves_the_published_folder(tmp_path):
    ctx = StageContext(base_model="m", root=str(tmp_path / "root"))
    calls = []

    def build(work: Workspace) -> dict:
        calls.append(work)
        (work.out / "result.txt").write_text("done")
        return {"rows": 3}

    ref = run_stage("demo", "fp1", ctx, build)
    again = run_stage("demo", "fp1", ctx, build)
    assert len(calls) == 1 and again == ref and ref.metrics == {"rows": 3}
    assert Path(ref.uri, "result.txt").read_text() == "done"
    assert not calls[0].out.exists()  # the temporary folder is gone, the published copy stays


def test_resumable_stage_keeps_scratch_on_failure_and_removes_it_once_published(tmp_path):
    ctx = StageContext(base_model="m", root=str(tmp_path / "root"))

    def crash(work: Workspace) -> dict:
        (work.scratch / "checkpoint-1").mkdir(parents=True)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_stage("train", "fp", ctx, crash, resumable=True)
    scratch = tmp_path / "root" / "scratch" / "train" / "fp"
    assert (scratch / "checkpoint-1").is_dir()  # what a retry resumes from

    def resume(work: Workspace) -> dict:
        assert (work.scratch / "checkpoint-1").is_dir()
        work.out.mkdir()
        (work.out / "adapter.bin").write_bytes(b"w")
        return {}

    ref = run_stage("train", "fp", ctx, resume, resumable=True)
    assert Path(ref.uri, "adapter.bin").exists() and not scratch.exists()


def test_stage_context_carries_the_block_name_never_its_secrets():
    ctx = RetrainParams(model={"base": "tiny", "revision": "v1"}, artifact_root="/tmp/x").stage_context()
    assert (ctx.base_model, ctx.base_revision, ctx.root, ctx.storage_block) == ("tiny", "v1", "/tmp/x", None)
    assert set(StageContext.model_fields) == {"base_model", "base_revision", "root", "storage_block", "tracking"}
    # the tracker travels as its URI (checked credential-free), experiment and run ids
    assert set(TrackingTarget.model_fields) == {"uri", "experiment_id", "parent_run_id", "tensorboard"}


# -- parameters are declared once ---------------------------------------------------------------
def test_grpo_prompt_data_comes_from_the_params_model():
    p = load_params("demo", ["grpo.datasets=[tuneline/arithmetic#8]", "data.formats={'*': alpaca}", "data.seed=7"])
    prompts = p.grpo_prompt_data()
    assert prompts.datasets == ["tuneline/arithmetic#8"] and prompts.validation_ratio == 0.0
    assert (prompts.seed, prompts.model_name, prompts.max_length) == (7, p.data.model_name, p.data.max_length)
    assert prompts.formats == {}  # the SFT sources' format override does not apply to the prompts


@pytest.mark.parametrize(
    "old, new",
    [
        ("grpo.use_vllm=true", "grpo.vllm.enabled"),
        ("grpo.vllm_python=/x/python", "grpo.vllm.python"),
        ("grpo.vllm_max_model_length=512", "grpo.vllm.max_model_length"),
    ],
)
def test_an_old_flat_vllm_key_names_the_new_one(old, new):
    with pytest.raises(ValidationError, match=new.replace(".", r"\.")):
        load_params("demo", [old])
    key, value = old.split("=")
    nested = new + "=" + value
    assert load_params("demo", [nested]).grpo.vllm is not None


def test_data_check_options_come_from_data_params(capsys):
    from flows.cli import main
    from tasks.data import DataParams

    with pytest.raises(SystemExit):
        main(["data", "check", "--help"])
    help_text = capsys.readouterr().out
    for name in DataParams.model_fields:
        if name != "datasets":
            assert "--" + name.replace("_", "-") in help_text, f"DataParams.{name} has no data check option"
    assert "delete,truncate_left,truncate_right" in help_text  # choices from the Literal


def test_data_check_takes_preset_set_and_typed_options(capsys):
    from flows.cli import main

    args = ["data", "check", "swift/self-cognition:en#6", "--preset", "demo", "--set", "data.validation_ratio=0.5"]
    assert main([*args, "--max-length", "null", "--no-strict", "--seed", "3"]) == 0
    assert "self-cognition" in capsys.readouterr().out
    assert main([*args, "--truncation", "sideways"]) == 1
    assert "truncation" in capsys.readouterr().err  # the model's own validation names the parameter
