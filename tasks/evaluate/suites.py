"""The suites' scoring and the generating suites: GSM8K exact answers, identity answers, validation
loss on assistant tokens, and one model run through every generating suite."""

from __future__ import annotations

import math
from typing import Any

from tasks.evaluate.humaneval import humaneval_prompt, score_humaneval
from tasks.evaluate.params import IDENTITY_QUESTIONS, EvalError, EvalParams
from tasks.models import training_chat_template
from tasks.scoring import answers_match, extract_answer


def gsm8k_prompt(question: str, config: EvalParams) -> str:
    """The user turn: the question, then the instruction saying where the answer goes."""
    return f"{question}\n{config.gsm8k_instruction}".strip()


def score_gsm8k(rows: list[dict[str, str]], completions: list[str]) -> tuple[float, list[dict[str, Any]]]:
    """Exact-answer accuracy: extracted answer vs gold, compared by math-verify (``tasks/scoring``).
    An unparsable completion (no answer found) is wrong.

    >>> rows = [{"question": "2+2?", "answer": "#### 4", "gold": "4"}] * 3
    >>> score_gsm8k(rows, ["2 + 2 = 4\\n#### 4", "so \\\\boxed{5}", "I cannot say."])[0]
    0.3333333333333333
    """
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows but {len(completions)} completions")
    details = []
    for row, completion in zip(rows, completions):
        predicted = extract_answer(completion)
        details.append(
            {
                "question": row["question"],
                "gold": row["gold"],
                "predicted": predicted,
                "correct": answers_match(predicted, row["gold"]),
                "completion": completion,
            }
        )
    return sum(d["correct"] for d in details) / max(len(details), 1), details


def score_identity(answers: list[str], name: str, author: str) -> tuple[float, list[dict[str, Any]]]:
    """Share of identity questions whose answer mentions what it should (the name, or the author),
    case-insensitively.

    >>> score_identity(["I am Quokka.", "I'm an AI.", "I am Quokka, made by the Tuneline team.", "Alibaba",
    ...                 "我是Quokka", "Quokka", "the tuneline team", "?"], "Quokka", "the Tuneline team")[0]
    0.625
    """
    details = []
    for (question, expects), answer in zip(IDENTITY_QUESTIONS, answers, strict=True):
        wanted = name if expects == "name" else author
        details.append(
            {"prompt": question, "expects": wanted, "answer": answer, "correct": wanted.casefold() in answer.casefold()}
        )
    return sum(d["correct"] for d in details) / len(details), details


def _chat(system_prompt: str, prompt: str) -> list[dict[str, str]]:
    """A one-turn chat, with the system prompt when there is one."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


def validation_metrics(
    model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int
) -> dict[str, float]:
    """Mean loss, perplexity and next-token accuracy over assistant tokens."""
    import torch

    template = training_chat_template(tokenizer) or tokenizer.chat_template
    encoded = [
        tokenizer.apply_chat_template(
            c, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
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
        raise EvalError("validation split has no assistant tokens to score")
    mean = total_loss / total_tokens
    return {
        "validation_loss": mean,
        "perplexity": math.exp(min(mean, 50)),
        "token_accuracy": total_correct / total_tokens,
    }


def generation_suites(
    engine, config: EvalParams, data: dict[str, Any], system_prompt: str, name: str, author: str
) -> tuple[dict[str, float], dict[str, Any]]:
    """Every generating suite on one model; returns (metrics, details per suite)."""
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    if "gsm8k" in config.suites:
        chats = [_chat(system_prompt, gsm8k_prompt(r["question"], config)) for r in data["gsm8k"]]
        metrics["gsm8k_accuracy"], details["gsm8k"] = score_gsm8k(
            data["gsm8k"], engine.generate(chats, config.gsm8k_max_new_tokens, 0.0, config.seed)
        )
    if "humaneval" in config.suites:
        chats = [_chat(system_prompt, humaneval_prompt(p)) for p in data["humaneval"]]
        metrics["humaneval_pass_at_1"], details["humaneval"] = score_humaneval(
            data["humaneval"], engine.generate(chats, config.humaneval_max_new_tokens, 0.0, config.seed), config
        )
    if "self_cognition" in config.suites:
        chats = [_chat(system_prompt, q) for q, _ in IDENTITY_QUESTIONS]
        metrics["self_cognition_accuracy"], details["self_cognition"] = score_identity(
            engine.generate(chats, config.identity_max_new_tokens, 0.0, config.seed), name, author
        )
    if "samples" in config.suites:
        chats = [_chat(system_prompt, p) for p in config.prompts]
        details["samples"] = engine.generate(chats, config.max_new_tokens, config.temperature, config.seed)
    return metrics, details
