"""Evaluation stage: the base model and the merged model (what will ship), side by side, and the
quality gate that decides whether the release happens.

Resource profile: one GPU when there is one, else CPU (the demo and tests).

Suites (chosen in the parameters, each run on both models):
- ``validation``: held-out loss, perplexity and token accuracy on the assistant tokens of the data
  stage's validation split (the same masking as training);
- ``self_cognition``: does the model answer identity questions with the configured name and author;
- ``samples``: a prompt set rendered side by side (not gated).

Quality gate: every gating metric of the tuned model must be at least the base's minus a tolerance
(validation loss: relative; accuracies: absolute). The report says why it passed or failed; the flow
refuses to release on a failure unless a person forces it.

Run the plain function without Prefect::

    python -c "from tasks.evaluate import *; print(evaluate_models(EvalParams(), 'BASE', 'TUNED', 'DATA_DIR', 'Name', 'Author'))"
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.models import training_chat_template
from tasks.store import StageRef, code_version, fingerprint, open_ref, stage_cache_key, store_for

STAGE = "evaluate"
Suite = Literal["validation", "self_cognition", "samples"]

DEFAULT_PROMPTS = [
    "Who are you?",
    "你是谁？",
    "Give me three tips for staying healthy.",
    "用三句话介绍一下长城。",
    "What is 17 * 3? Answer briefly.",
]
IDENTITY_QUESTIONS = ["Who are you?", "What is your name?", "Who created you?", "Introduce yourself.", "你是谁？", "你的作者是谁？"]


class EvalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suites: list[Suite] = Field(default=["validation", "self_cognition", "samples"], min_length=1, description="Suites run on the base and the tuned model.")
    validation_max_rows: int = Field(default=200, ge=1, le=100_000, description="Rows of the validation split scored.")
    prompts: list[str] = Field(default=DEFAULT_PROMPTS, min_length=1, max_length=100, description="Prompts rendered side by side (samples suite).")
    temperature: float = Field(default=0.3, ge=0.0, le=2.0, description="Sampling temperature of the samples suite (0 = greedy).")
    max_new_tokens: int = Field(default=512, ge=1, le=8192, description="Longest generated answer.")
    batch_size: int = Field(default=8, ge=1, le=512, description="Rows per forward pass.")
    loss_tolerance: float = Field(default=0.02, ge=0.0, le=1.0, description="Gate: tuned validation loss may exceed the base's by this relative share.")
    accuracy_tolerance: float = Field(default=0.01, ge=0.0, le=1.0, description="Gate: a tuned accuracy may fall below the base's by this much (absolute).")
    force_release: bool = Field(default=False, description="Release even when the quality gate fails (a person's decision; recorded in the manifest).")
    seed: int = Field(default=0, ge=0, description="Seed for sampling.")


# ----------------------------------------------------------------------------------------------
# Plain functions
# ----------------------------------------------------------------------------------------------
def _load(model_dir: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, tokenizer


def validation_metrics(model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int) -> dict[str, float]:
    """Mean loss, perplexity and next-token accuracy over assistant tokens."""
    import torch

    template = training_chat_template(tokenizer) or tokenizer.chat_template
    encoded = [
        tokenizer.apply_chat_template(c, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        for c in conversations
    ]
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    device = next(model.parameters()).device
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n] = torch.tensor(e["input_ids"])
            attn[j, :n] = 1
            mask = torch.tensor(e["assistant_masks"]).bool()
            labels[j, :n] = torch.where(mask, ids[j, :n], -100)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        valid = shift_labels != -100
        loss = torch.nn.functional.cross_entropy(shift_logits[valid], shift_labels[valid], reduction="sum")
        total_loss += loss.item()
        total_correct += (shift_logits.argmax(-1)[valid] == shift_labels[valid]).sum().item()
        total_tokens += valid.sum().item()
    if total_tokens == 0:
        raise ValueError("validation split has no assistant tokens to score")
    mean = total_loss / total_tokens
    return {"validation_loss": mean, "perplexity": math.exp(min(mean, 50)), "token_accuracy": total_correct / total_tokens}


def generate(model, tokenizer, prompts: list[str], system_prompt: str, max_new_tokens: int, temperature: float, batch_size: int, seed: int) -> list[str]:
    """Batched chat generation (left padding)."""
    import torch

    tokenizer.padding_side = "left"
    outputs: list[str] = []
    torch.manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        chats = [([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": p}] for p in prompts[i : i + batch_size]]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        outputs.extend(tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True))
    return [o.strip() for o in outputs]


def self_cognition(model, tokenizer, system_prompt: str, name: str, author: str, config: EvalParams) -> tuple[dict[str, float], list[dict[str, str]]]:
    answers = generate(model, tokenizer, IDENTITY_QUESTIONS, system_prompt, 64, 0.0, config.batch_size, config.seed)
    hits = [name.lower() in a.lower() or author.lower() in a.lower() for a in answers]
    return {"self_cognition_accuracy": sum(hits) / len(hits)}, [{"prompt": q, "answer": a} for q, a in zip(IDENTITY_QUESTIONS, answers)]


def quality_gate(base: dict[str, float], tuned: dict[str, float], config: EvalParams) -> dict[str, Any]:
    """Compare gating metrics. Loss: lower is better (relative tolerance); accuracies: higher is
    better (absolute tolerance). Returns ``{"passed", "reasons", "checks"}``.

    >>> cfg = EvalParams()
    >>> quality_gate({"validation_loss": 1.0}, {"validation_loss": 1.01}, cfg)["passed"]
    True
    >>> quality_gate({"gsm8k_accuracy": 0.35}, {"gsm8k_accuracy": 0.31}, cfg)["reasons"]
    ['gsm8k_accuracy 0.31 < base 0.35 − 0.01']
    """
    checks, reasons = [], []
    for metric in sorted(set(base) & set(tuned)):
        b, t = base[metric], tuned[metric]
        if metric == "validation_loss":
            limit = b * (1 + config.loss_tolerance)
            ok = t <= limit
            rule = f"{metric} {t:.4g} > base {b:.4g} × (1 + {config.loss_tolerance:g})"
        elif metric.endswith("accuracy") and metric != "token_accuracy":
            limit = b - config.accuracy_tolerance
            ok = t >= limit - 1e-12
            rule = f"{metric} {t:.4g} < base {b:.4g} − {config.accuracy_tolerance:g}"
        else:
            continue
        checks.append({"metric": metric, "base": b, "tuned": t, "limit": limit, "passed": ok})
        if not ok:
            reasons.append(rule)
    return {"passed": not reasons, "reasons": reasons, "checks": checks}


def evaluate_models(config: EvalParams, base_dir: str, tuned_dir: str, data_dir: str | None, name: str, author: str, system_prompt: str = "") -> dict[str, Any]:
    """Run the suites on both models; return the report (metrics per model, samples, gate)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    conversations = []
    if "validation" in config.suites and data_dir:
        lines = (Path(data_dir) / "validation.jsonl").read_text(encoding="utf-8").splitlines()
        conversations = [json.loads(line)["messages"] for line in lines[: config.validation_max_rows] if line.strip()]
    metrics: dict[str, dict[str, float]] = {}
    samples: dict[str, list[str]] = {}
    identity: dict[str, list[dict[str, str]]] = {}
    for label, model_dir in (("base", base_dir), ("tuned", tuned_dir)):
        model, tokenizer = _load(model_dir, device)
        metrics[label] = {}
        if conversations:
            metrics[label].update(validation_metrics(model, tokenizer, conversations, config.batch_size))
        if "self_cognition" in config.suites:
            m, identity[label] = self_cognition(model, tokenizer, system_prompt, name, author, config)
            metrics[label].update(m)
        if "samples" in config.suites:
            samples[label] = generate(model, tokenizer, config.prompts, system_prompt, config.max_new_tokens, config.temperature, config.batch_size, config.seed)
        del model
    gate = quality_gate(metrics["base"], metrics["tuned"], config)
    return {"metrics": metrics, "gate": gate, "samples": {"prompts": config.prompts, **samples}, "self_cognition": identity, "device": device}


def metrics_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    return [
        {"metric": k, "base": round(base[k], 4), "tuned": round(tuned[k], 4), "delta": round(tuned[k] - base[k], 4)}
        for k in base if k in tuned
    ]


def samples_markdown(report: dict[str, Any]) -> str:
    lines = ["| prompt | base | tuned |", "|---|---|---|"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", "<br>")[:600]  # noqa: E731
    s = report["samples"]
    for i, p in enumerate(s.get("prompts", [])):
        if "base" in s:
            lines.append(f"| {cell(p)} | {cell(s['base'][i])} | {cell(s['tuned'][i])} |")
    for pair in zip(report.get("self_cognition", {}).get("base", []), report.get("self_cognition", {}).get("tuned", [])):
        lines.append(f"| {cell(pair[0]['prompt'])} | {cell(pair[0]['answer'])} | {cell(pair[1]['answer'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Prefect task
# ----------------------------------------------------------------------------------------------
def fingerprint_of(config: EvalParams, merged: StageRef, dataset: StageRef, base_model: str, base_revision: str, name: str, author: str, system_prompt: str, root: str, storage_block: str | None = None) -> str:
    cfg = {"config": config.model_dump(exclude={"force_release"}), "model": base_model, "revision": base_revision, "name": name, "author": author, "system": system_prompt}
    return fingerprint(STAGE, code_version(evaluate_models), cfg, upstream=[merged.fingerprint, dataset.fingerprint])


@task(name="evaluate", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["gpu"])
def evaluate(config: EvalParams, merged: StageRef, dataset: StageRef, base_model: str, base_revision: str, name: str, author: str, system_prompt: str, root: str, storage_block: str | None = None) -> StageRef:
    """Base vs merged on the chosen suites, with the quality gate in the metrics. One GPU or CPU."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.models import resolve_model

    fp = fingerprint_of(config, merged, dataset, base_model, base_revision, name, author, system_prompt, root)
    store = store_for(root, storage_block)
    if (ref := store.completed(STAGE, fp)) is None:
        report = evaluate_models(
            config, str(resolve_model(base_model, base_revision)), str(open_ref(merged, storage_block)),
            str(open_ref(dataset, storage_block)), name, author, system_prompt,
        )
        with tempfile.TemporaryDirectory(prefix="tuneline-eval-") as tmp:
            (Path(tmp) / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
            (Path(tmp) / "samples.md").write_text(samples_markdown(report), encoding="utf-8")
            ref = store.publish(STAGE, fp, Path(tmp), {"base": report["metrics"]["base"], "tuned": report["metrics"]["tuned"], "gate": report["gate"]})
    report = store.read_json(f"stages/{STAGE}/{fp}/report.json")
    create_table_artifact(key="eval-metrics", table=metrics_table(report), description="Base vs tuned (the merged model that ships)")
    create_markdown_artifact(key="eval-samples", markdown=samples_markdown(report), description="Side-by-side answers")
    return ref
