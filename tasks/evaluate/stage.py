"""The evaluation stage itself: the base, the tuned model and the champion through the suites
(``evaluate_models``), its fingerprint (the champion release is part of it), and the Prefect task that
obtains the champion's results, stores the report and publishes the artifacts."""

from __future__ import annotations

import json
from typing import Any

from tasks.artifacts.registry import ChampionRef
from tasks.artifacts.store import StageRef
from tasks.core.common import publish_markdown, publish_table, task
from tasks.core.fingerprints import code_identity, content_of, fingerprint, stack_versions, with_lineage
from tasks.core.stage import StageContext, Workspace, run_stage, stage_cache_key
from tasks.evaluate.champion import ChampionInput, measurement_key, prepare_champion
from tasks.evaluate.data import (
    data_fingerprints,
    gsm8k_rows,
    humaneval_problems,
    identity_questions,
    validation_conversations,
)
from tasks.evaluate.engines import (
    TransformersEngine,
    VLLMEngine,
    evaluation_dtype,
    free_memory,
    load_model,
    select_engine,
)
from tasks.evaluate.gate import compare_models, quality_gate
from tasks.evaluate.humaneval import check_code_isolation
from tasks.evaluate.params import STAGE, EvalParams
from tasks.evaluate.report import metrics_table, samples_markdown
from tasks.evaluate.suites import generation_suites, metrics_from_items, validation_items
from tasks.runtime.hardware import preflight
from tasks.runtime.requirements import ONE_GPU


def evaluate_models(
    config: EvalParams,
    base_dir: str,
    tuned_dir: str,
    data_dir: str | None,
    name: str,
    author: str,
    system_prompt: str = "",
    storage_block: str | None = None,
    champion: ChampionInput | None = None,
    measurement: str | None = None,
    anchor: ChampionInput | None = None,
) -> dict[str, Any]:
    """Run the suites on the base, the tuned model and (when their results cannot be reused) the
    champion and the anchor, one model in memory at a time; compare item by item and apply the gate; return the
    report (``report.json``)."""
    import torch

    # Every input is read and checked before the first model loads.
    data: dict[str, Any] = {}
    if "gsm8k" in config.suites:
        data["gsm8k"] = gsm8k_rows(config, storage_block)
    if "humaneval" in config.suites:
        data["humaneval"] = humaneval_problems(config, storage_block)
    if "self_cognition" in config.suites:
        data["self_cognition"] = identity_questions()
    conversations = validation_conversations(config, data_dir) if "validation" in config.suites else []
    sandbox_mode = None  # how generated code runs: root / userns (isolated) or plain (allowed on purpose)
    if "humaneval" in config.suites:  # refuses unisolated code (unless allowed) before any model loads
        sandbox_mode = check_code_isolation(config)
    engine_name = select_engine(config.engine)
    # The flow pins the device (tasks/runtime/requirements.py); "auto" outside a flow: a GPU when torch sees one.
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = evaluation_dtype(device)  # what ships on this card, not what emulation allows

    items: dict[str, dict[str, list[float]]] = {}
    details: dict[str, dict[str, Any]] = {}
    runs = [("base", base_dir), ("tuned", tuned_dir)]
    same = anchor is not None and champion is not None and anchor.release_id == champion.release_id
    for label, rival in (("champion", champion), ("anchor", None if same else anchor)):
        if rival is not None and rival.how == "evaluated":
            runs.append((label, str(rival.model_dir)))
        elif rival is not None:
            items[label], details[label] = rival.items, rival.details
    generating = [s for s in config.suites if s != "validation"]
    for label, model_dir in runs:
        model, tokenizer = load_model(model_dir, device, precision)
        items[label] = {}
        if conversations:
            items[label] = validation_items(model, tokenizer, conversations, config.batch_size, label)
        if generating:
            if engine_name == "vllm":  # free the transformers copy before vLLM takes the GPU
                del model
                free_memory()
                engine = VLLMEngine(model_dir, config.seed)
            else:
                engine = TransformersEngine(model, tokenizer, config.batch_size, engine_name == "continuous")
                del model
            more, details[label] = generation_suites(engine, config, data, system_prompt, name, author, label)
            items[label].update(more)
            engine.close()
        else:
            del model
            free_memory()
    if same:  # the anchor is the champion: measured once
        items["anchor"], details["anchor"] = items["champion"], details.get("champion", {})
    labels = [label for label in ("base", "champion", "anchor", "tuned") if label in items]
    items = {label: items[label] for label in labels}
    champion_id = champion.release_id if champion else None
    anchor_id = anchor.release_id if anchor else None
    comparisons = compare_models(items, config, champion_id, anchor_id)
    verdict = quality_gate(
        items, config, champion_id, named=bool(name.strip()), comparisons=comparisons, anchor_id=anchor_id
    )
    scored = ("gsm8k", "humaneval", "self_cognition")
    return {
        "metrics": {label: metrics_from_items(items[label]) for label in labels},
        "items": items,
        "comparisons": comparisons,
        "gate": verdict,
        "champion": champion.summary() if champion else None,
        "anchor": anchor.summary() if anchor else None,
        "measurement": measurement,
        "suites": list(config.suites),
        "engine": engine_name,
        "device": device,
        "precision": precision,
        "sandbox_mode": sandbox_mode,
        "sizes": {"validation": len(conversations), **{k: len(v) for k, v in data.items()}},
        "samples": {"prompts": config.prompts, **{k: v["samples"] for k, v in details.items() if "samples" in v}},
        "details": {s: {label: details[label][s] for label in labels if s in details.get(label, {})} for s in scored},
    }


CODE = "tasks.evaluate.stage"  # its imports reach the whole package, answer matching and the sandbox


def fingerprint_of(
    config: EvalParams,
    merged: StageRef,
    dataset: StageRef,
    name: str,
    author: str,
    system_prompt: str,
    ctx: StageContext,
    champion: ChampionRef | None = None,
    anchor: ChampionRef | None = None,
) -> str:
    """The evaluation code (suites, scoring, sandbox, gate), its stack (engine and scorers included),
    the parameters, the base model's content, the merged model's and validation rows' content, the
    evaluation data's content and the champion (docs/caching.md)."""
    # force_release is a decision about the release, not about the measurement: not in the key.
    # The champion is: another release to beat is another verdict (its manifest digest is its content).
    cfg = {
        "config": config.model_dump(exclude={"force_release"}),
        "model": ctx.model_identity(),
        "name": name,
        "author": author,
        "system": system_prompt,
        "champion": champion.model_dump(include={"release_id", "manifest_sha256"}) if champion else None,
        # The anchor too (a pin or the first release): another cumulative reference, another verdict.
        "anchor": anchor.model_dump(include={"release_id", "manifest_sha256"}) if anchor else None,
    }
    upstream = [content_of(merged), content_of(dataset)]
    sources = data_fingerprints(config, ctx.storage_block)
    stack = stack_versions("evaluation")  # the engine (vLLM) and the scorers included
    return fingerprint(STAGE, code_identity(CODE), cfg, upstream=upstream, sources=sources, stack=stack)


@task(name="evaluate", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["gpu"])
def evaluate(
    config: EvalParams,
    merged: StageRef,
    dataset: StageRef,
    name: str,
    author: str,
    system_prompt: str,
    ctx: StageContext,
    champion: ChampionRef | None = None,
    anchor: ChampionRef | None = None,
) -> StageRef:
    """Base vs merged (and vs the champion release, when there is one) on the chosen suites, with the
    quality gate in the metrics.

    Resource profile: one GPU (or CPU); one model in memory at a time; HumanEval programs in
    ``humaneval_workers`` sandboxes. The task itself never raises on a failed gate: it records it.
    """
    if config.device == "cuda":  # before anything is loaded (tasks/runtime/requirements.py)
        preflight(ONE_GPU.requirement)
    fp = fingerprint_of(config, merged, dataset, name, author, system_prompt, ctx, champion, anchor)
    store = ctx.store()

    def build(work: Workspace) -> dict[str, Any]:
        rows = content_of(dataset)
        measurement = measurement_key(config, rows, system_prompt, name, author, ctx.storage_block)
        rival = prepare_champion(store, champion, measurement) if champion else None
        same = rival is not None and anchor is not None and anchor.release_id == rival.release_id
        pinned = rival if same else (prepare_champion(store, anchor, measurement) if anchor else None)
        result = evaluate_models(
            config,
            str(ctx.model_dir()),
            str(ctx.open(merged)),
            str(ctx.open(dataset)),
            name,
            author,
            system_prompt,
            ctx.storage_block,
            champion=rival,
            measurement=measurement,
            anchor=pinned,
        )
        text = json.dumps(result, indent=2, ensure_ascii=False)
        (work.out / "report.json").write_text(text, encoding="utf-8")
        (work.out / "samples.md").write_text(samples_markdown(result), encoding="utf-8")
        metrics = result["metrics"]
        return {
            "base": metrics["base"],
            "tuned": metrics["tuned"],
            "champion": result["champion"],
            "anchor": result["anchor"],
            "gate": result["gate"],
        }

    lineage = {"stage": STAGE, "code": code_identity(CODE), "stack": stack_versions("evaluation")}
    lineage |= {"model": ctx.model_identity(), "inputs": [merged, dataset]}
    ref = run_stage(STAGE, fp, ctx, with_lineage(build, **lineage), store=store)
    # Artifacts on every run, cache hit or not: each flow run shows its own verdict.
    stored = store.read_json(f"stages/{STAGE}/{fp}/report.json")
    title = "Base / champion / tuned (the merged model that ships)" if stored.get("champion") else "Base vs tuned"
    publish_table("eval-metrics", metrics_table(stored), title)
    publish_markdown("eval-samples", samples_markdown(stored), "Side-by-side answers")
    return ref
