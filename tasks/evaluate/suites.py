"""The suites' scoring and the generating suites: GSM8K exact answers, identity answers, validation
loss on assistant tokens, and one model run through every generating suite.

Every suite keeps its per-item results (``items``: one number per row, question or problem, in a fixed
order), because the gate compares models item by item (``stats.py``); a metric is the mean of its
items (perplexity: ``exp`` of the mean loss)."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from tasks.core.models import training_chat_template
from tasks.core.scoring import answers_match, extract_answer
from tasks.evaluate.data import identity_questions
from tasks.evaluate.humaneval import humaneval_prompt, score_humaneval
from tasks.evaluate.params import EvalError, EvalParams


def gsm8k_prompt(question: str, config: EvalParams) -> str:
    """The user turn: the question, then the instruction saying where the answer goes."""
    return f"{question}\n{config.gsm8k_instruction}".strip()


def score_gsm8k(rows: list[dict[str, str]], completions: list[str]) -> tuple[float, list[dict[str, Any]]]:
    """Exact-answer accuracy: extracted answer vs gold, compared by math-verify (``tasks/scoring``).
    An unparsable completion (no answer found) is wrong, and so is one the engine cut off at
    ``gsm8k_max_new_tokens`` (a ``str`` with ``cut_off`` true): its last number is a step, not an answer.

    >>> rows = [{"question": "2+2?", "answer": "#### 4", "gold": "4"}] * 3
    >>> score_gsm8k(rows, ["2 + 2 = 4\\n#### 4", "so \\\\boxed{5}", "I cannot say."])[0]
    0.3333333333333333
    """
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows but {len(completions)} completions")
    details = []
    for row, completion in zip(rows, completions):
        cut_off = bool(getattr(completion, "cut_off", False))
        predicted = extract_answer(completion)
        correct = not cut_off and answers_match(predicted, row["gold"])
        status = "cut_off" if cut_off else "correct" if correct else "no_answer" if predicted is None else "wrong"
        details.append(
            {
                "question": row["question"],
                "gold": row["gold"],
                "predicted": predicted,
                "correct": correct,
                "status": status,
                "completion": str(completion),
            }
        )
    return sum(d["correct"] for d in details) / max(len(details), 1), details


def score_identity(
    answers: list[str], name: str, author: str, questions: list[dict[str, str]] | None = None
) -> tuple[float, list[dict[str, Any]]]:
    """Share of identity questions whose answer mentions what it should (the name, or the author),
    case-insensitively. ``questions``: the held-out set (``identity_questions()``) unless given.

    >>> qs = [{"question": "Who?", "expects": "name"}] * 3 + [{"question": "谁开发了你？", "expects": "author"}]
    >>> score_identity(["I am Quokka.", "I'm an AI.", "我是Quokka", "the tuneline team"], "Quokka",
    ...                "the Tuneline team", qs)[0]
    0.75
    """
    questions = identity_questions() if questions is None else questions
    details = []
    for q, answer in zip(questions, answers, strict=True):
        wanted = name if q["expects"] == "name" else author
        correct = bool(wanted.strip()) and wanted.casefold() in answer.casefold()
        details.append({"prompt": q["question"], "expects": wanted, "answer": answer, "correct": correct})
    return sum(d["correct"] for d in details) / max(len(details), 1), details


def _chat(system_prompt: str, prompt: str) -> list[dict[str, str]]:
    """A one-turn chat, with the system prompt when there is one."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


@contextmanager
def suite_progress(label: str, suite: str, total: int, engine: Any = None) -> Iterator[Any]:
    """A progress bar per model and suite (items done / total) on stderr, where the trainer's goes: the
    evaluation takes minutes on a slow machine. An engine that generates in batches moves it per batch
    (``engine.on_items``); one that generates everything at once moves it when the suite ends."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"evaluate {label} · {suite}".strip(), unit="item", file=sys.stderr, mininterval=0)
    if engine is not None:
        engine.on_items = bar.update
    try:
        yield bar
        bar.update(total - bar.n)
    finally:
        if engine is not None:
            engine.on_items = None
        bar.close()


def validation_items(
    model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int, label: str = ""
) -> dict[str, list[float]]:
    """Per row: the mean loss and the next-token accuracy over its assistant tokens (the same masking
    as training). Each row counts once in the metrics, a long answer no more than a short one: the
    unit the gate's paired test resamples and flips."""
    template = training_chat_template(tokenizer) or tokenizer.chat_template
    encoded = [
        tokenizer.apply_chat_template(
            c, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        for c in conversations
    ]
    losses: list[float] = []
    accuracies: list[float] = []
    device = next(model.parameters()).device
    with suite_progress(label, "validation", len(encoded)) as bar:
        for i in range(0, len(encoded), batch_size):
            _validation_batch(model, tokenizer, encoded, i, batch_size, device, losses, accuracies)
            bar.update(min(batch_size, len(encoded) - i))
    return {"validation_loss": losses, "token_accuracy": accuracies}


def _validation_batch(model, tokenizer, encoded, i: int, batch_size: int, device, losses, accuracies) -> None:
    """One batch of ``validation_items``: per row, its mean loss and accuracy appended."""
    import torch

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
    # Loss on the assistant tokens only (as before: no softmax over padding), summed back per row.
    rows = valid.nonzero()[:, 0]
    token_loss = torch.nn.functional.cross_entropy(shift_logits[valid], shift_labels[valid], reduction="none")
    hits = (shift_logits[valid].argmax(-1) == shift_labels[valid]).float()
    counts = valid.sum(dim=1)
    loss_sums = torch.zeros(len(chunk), device=device).index_add_(0, rows, token_loss)
    hit_sums = torch.zeros(len(chunk), device=device).index_add_(0, rows, hits)
    for j, (count, loss, hit) in enumerate(zip(counts.tolist(), loss_sums.tolist(), hit_sums.tolist())):
        if count == 0:
            raise EvalError(f"validation row {i + j}: no assistant tokens to score")
        losses.append(loss / count)
        accuracies.append(hit / count)


def metrics_from_items(items: dict[str, list[float]]) -> dict[str, float]:
    """Each metric as the mean of its items; perplexity from the mean validation loss.

    >>> metrics_from_items({"validation_loss": [1.0, 3.0], "gsm8k_accuracy": [1.0, 0.0, 0.0, 1.0]})
    {'validation_loss': 2.0, 'perplexity': 7.38905609893065, 'gsm8k_accuracy': 0.5}
    """
    metrics: dict[str, float] = {}
    for metric, values in items.items():
        metrics[metric] = sum(values) / len(values) if values else float("nan")
        if metric == "validation_loss":
            metrics["perplexity"] = math.exp(min(metrics[metric], 50))
    return metrics


def validation_metrics(
    model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int
) -> dict[str, float]:
    """Mean loss, perplexity and next-token accuracy over assistant tokens (row means)."""
    return metrics_from_items(validation_items(model, tokenizer, conversations, batch_size))


def generation_suites(
    engine, config: EvalParams, data: dict[str, Any], system_prompt: str, name: str, author: str, label: str = ""
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Every generating suite on one model; returns (items per metric, details per suite)."""

    def generate(suite: str, chats: list, max_new_tokens: int, temperature: float = 0.0) -> list:
        with suite_progress(label, suite, len(chats), engine):
            return engine.generate(chats, max_new_tokens, temperature, config.seed)

    items: dict[str, list[float]] = {}
    details: dict[str, Any] = {}
    if "gsm8k" in config.suites:
        chats = [_chat(system_prompt, gsm8k_prompt(r["question"], config)) for r in data["gsm8k"]]
        _, details["gsm8k"] = score_gsm8k(data["gsm8k"], generate("gsm8k", chats, config.gsm8k_max_new_tokens))
        items["gsm8k_accuracy"] = [float(d["correct"]) for d in details["gsm8k"]]
    if "humaneval" in config.suites:
        chats = [_chat(system_prompt, humaneval_prompt(p)) for p in data["humaneval"]]
        _, details["humaneval"] = score_humaneval(
            data["humaneval"], generate("humaneval", chats, config.humaneval_max_new_tokens), config
        )
        items["humaneval_pass_at_1"] = [float(d["passed"]) for d in details["humaneval"]]
    if "self_cognition" in config.suites:
        chats = [_chat(system_prompt, q["question"]) for q in data["self_cognition"]]
        _, details["self_cognition"] = score_identity(
            [str(a) for a in generate("self_cognition", chats, config.identity_max_new_tokens)],
            name,
            author,
            data["self_cognition"],
        )
        items["self_cognition_accuracy"] = [float(d["correct"]) for d in details["self_cognition"]]
    if "samples" in config.suites:
        chats = [_chat(system_prompt, p) for p in config.prompts]
        details["samples"] = [str(a) for a in generate("samples", chats, config.max_new_tokens, config.temperature)]
    return items, details
