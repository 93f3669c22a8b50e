"""Answer a list of conversations with one model folder, greedy and sampled with a fixed seed
(``tuneline compare``, flows/compare.py).

Engine: transformers in this process (the project venv has no vLLM, docs/vllm-cpu.md), on the first
GPU when there is one, else the CPU. One model is loaded at a time and freed before the next. The
folder's own tokenizer and chat template format each conversation, as a server would.

Reproducible: greedy decoding is deterministic; before each sampled answer the random generators are
seeded (``transformers.set_seed``) with the same seed, so a sampled answer depends on the model, the
conversation and the settings only, not on which prompts came before it.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Sampling:
    """How every model answers: ``max_new_tokens`` for both answers; the sampled answer's settings."""

    max_new_tokens: int = 128
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.9

    def describe(self) -> str:
        return (
            f"greedy, and sampled with seed {self.seed} (temperature {self.temperature}, top_p {self.top_p}); "
            f"at most {self.max_new_tokens} new tokens"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_all(
    model_dir: str | Path,
    conversations: list[list[dict[str, str]]],
    sampling: Sampling,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load ``model_dir`` and answer every conversation (its last turn is the user's) twice: greedy and
    sampled. Returns ``{"engine", "version", "device", "load_s", "answers": [{"greedy", "sampled"}]}``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda _: None)
    started = time.monotonic()
    # A release's own files only: never a tokenizer or weights borrowed from the hub or a cache.
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_dir} has no chat template (tokenizer_config.json / chat_template.jinja)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype="auto").to(device)
    model.eval()
    load_s = time.monotonic() - started
    say(f"loaded in {load_s:.1f}s on {device}")
    answers = []
    try:
        for n, messages in enumerate(conversations, 1):
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(device)
            greedy = _generate(model, tokenizer, ids, sampling, sample=False)
            transformers.set_seed(sampling.seed)
            sampled = _generate(model, tokenizer, ids, sampling, sample=True)
            answers.append({"greedy": greedy, "sampled": sampled})
            say(f"prompt {n}/{len(conversations)} answered")
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {
        "engine": "transformers",
        "version": transformers.__version__,
        "device": device,
        "load_s": round(load_s, 1),
        "answers": answers,
    }


def _generate(model: Any, tokenizer: Any, ids: Any, sampling: Sampling, sample: bool) -> str:
    import torch

    options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": sampling.max_new_tokens}
    if sample:
        # explicit, so a model's generation_config.json (its own temperature, top_k) does not change the settings
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**ids, pad_token_id=pad, **options)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
