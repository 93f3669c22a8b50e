"""The evaluation stage itself: both models through the suites (``evaluate_models``), its fingerprint,
and the Prefect task that stores the report and publishes the artifacts."""

from __future__ import annotations

import json
from typing import Any

from tasks.common import publish_markdown, publish_table, task
from tasks.evaluate.data import data_fingerprints, gsm8k_rows, humaneval_problems, validation_conversations
from tasks.evaluate.engines import TransformersEngine, VLLMEngine, free_memory, load_model, select_engine
from tasks.evaluate.gate import quality_gate
from tasks.evaluate.humaneval import score_humaneval
from tasks.evaluate.params import STAGE, EvalParams
from tasks.evaluate.report import metrics_table, samples_markdown
from tasks.evaluate.suites import generation_suites, validation_metrics
from tasks.fingerprints import code_version, fingerprint
from tasks.stage import StageContext, Workspace, run_stage, stage_cache_key
from tasks.store import StageRef


def evaluate_models(
    config: EvalParams,
    base_dir: str,
    tuned_dir: str,
    data_dir: str | None,
    name: str,
    author: str,
    system_prompt: str = "",
    storage_block: str | None = None,
) -> dict[str, Any]:
    """Run the suites on both models, one model in memory at a time; return the report."""
    import torch

    # Every input is read and checked before the first model loads.
    data: dict[str, Any] = {}
    if "gsm8k" in config.suites:
        data["gsm8k"] = gsm8k_rows(config, storage_block)
    if "humaneval" in config.suites:
        data["humaneval"] = humaneval_problems(config, storage_block)
    conversations = validation_conversations(config, data_dir) if "validation" in config.suites else []
    engine_name = select_engine(config.engine)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    metrics: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, Any]] = {}
    generating = [s for s in config.suites if s != "validation"]
    for label, model_dir in (("base", base_dir), ("tuned", tuned_dir)):
        model, tokenizer = load_model(model_dir, device)
        metrics[label] = validation_metrics(model, tokenizer, conversations, config.batch_size) if conversations else {}
        if generating:
            if engine_name == "vllm":  # free the transformers copy before vLLM takes the GPU
                del model
                free_memory()
                engine = VLLMEngine(model_dir, config.seed)
            else:
                engine = TransformersEngine(model, tokenizer, config.batch_size)
                del model
            m, details[label] = generation_suites(engine, config, data, system_prompt, name, author)
            metrics[label].update(m)
            engine.close()
        else:
            del model
            free_memory()
    verdict = quality_gate(metrics["base"], metrics["tuned"], config)
    scored = ("gsm8k", "humaneval", "self_cognition")
    return {
        "metrics": metrics,
        "gate": verdict,
        "suites": list(config.suites),
        "engine": engine_name,
        "device": device,
        "sizes": {"validation": len(conversations), **{k: len(v) for k, v in data.items()}},
        "samples": {"prompts": config.prompts, **{k: v["samples"] for k, v in details.items() if "samples" in v}},
        "details": {s: {label: details[label][s] for label in details if s in details[label]} for s in scored},
    }


def _code() -> str:
    """The evaluation code's version: every module of this package, so that editing any of them
    (a scoring fix, a new prompt) reruns the stage."""
    # One name from each module: code_version hashes the module that defines it.
    one_each = (EvalParams, gsm8k_rows, score_humaneval, generation_suites, load_model, quality_gate)
    return "+".join(code_version(obj) for obj in (*one_each, metrics_table, evaluate_models))


def fingerprint_of(
    config: EvalParams,
    merged: StageRef,
    dataset: StageRef,
    name: str,
    author: str,
    system_prompt: str,
    ctx: StageContext,
) -> str:
    # force_release is a decision about the release, not about the measurement: not in the key.
    cfg = {
        "config": config.model_dump(exclude={"force_release"}),
        "model": ctx.base_model,
        "revision": ctx.base_revision,
        "name": name,
        "author": author,
        "system": system_prompt,
    }
    upstream = [merged.fingerprint, dataset.fingerprint]
    return fingerprint(STAGE, _code(), cfg, upstream=upstream, sources=data_fingerprints(config))


@task(name="evaluate", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["gpu"])
def evaluate(
    config: EvalParams,
    merged: StageRef,
    dataset: StageRef,
    name: str,
    author: str,
    system_prompt: str,
    ctx: StageContext,
) -> StageRef:
    """Base vs merged on the chosen suites, with the quality gate in the metrics.

    Resource profile: one GPU (or CPU); one model in memory at a time; HumanEval programs in
    ``humaneval_workers`` sandboxes. The task itself never raises on a failed gate: it records it.
    """
    fp = fingerprint_of(config, merged, dataset, name, author, system_prompt, ctx)
    store = ctx.store()

    def build(work: Workspace) -> dict[str, Any]:
        result = evaluate_models(
            config,
            str(ctx.model_dir()),
            str(ctx.open(merged)),
            str(ctx.open(dataset)),
            name,
            author,
            system_prompt,
            ctx.storage_block,
        )
        text = json.dumps(result, indent=2, ensure_ascii=False)
        (work.out / "report.json").write_text(text, encoding="utf-8")
        (work.out / "samples.md").write_text(samples_markdown(result), encoding="utf-8")
        return {"base": result["metrics"]["base"], "tuned": result["metrics"]["tuned"], "gate": result["gate"]}

    ref = run_stage(STAGE, fp, ctx, build, store=store)
    # Artifacts on every run, cache hit or not: each flow run shows its own verdict.
    stored = store.read_json(f"stages/{STAGE}/{fp}/report.json")
    publish_table("eval-metrics", metrics_table(stored), "Base vs tuned (the merged model that ships)")
    publish_markdown("eval-samples", samples_markdown(stored), "Side-by-side answers")
    return ref
