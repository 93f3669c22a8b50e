"""Generation engines and model loading: batched ``transformers`` ``generate``, or vLLM on the merged
folder when it is installed and a GPU is present (``select_engine``)."""

from __future__ import annotations

import gc
import importlib.util
from typing import Any, Callable

from tasks.common import load_tokenizer
from tasks.evaluate.params import Engine, EvalError


def select_engine(
    requested: Engine, find_spec: Callable[[str], Any] = importlib.util.find_spec, has_gpu: bool | None = None
) -> str:
    """``transformers`` or ``vllm``. ``auto`` takes vLLM only when it is installed and a GPU is
    present (vLLM has no useful CPU path here); ``vllm`` without vLLM installed is an error.

    >>> select_engine("auto", find_spec=lambda name: None, has_gpu=True)
    'transformers'
    """
    installed = find_spec("vllm") is not None
    if requested == "vllm" and not installed:
        raise EvalError("eval.engine=vllm but vLLM is not installed (pip install 'tuneline[vllm]'), or use engine=auto")
    if requested == "transformers":
        return "transformers"
    if requested == "vllm":
        return "vllm"
    if has_gpu is None:
        import torch

        has_gpu = torch.cuda.is_available()
    return "vllm" if installed and has_gpu else "transformers"


def load_model(model_dir: str, device: str) -> tuple[Any, Any]:
    """The model (bf16 on a GPU that has it, else fp32), in eval mode, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, tokenizer


class TransformersEngine:
    """Batched ``model.generate`` with left padding; prompts sorted by length so a batch holds
    similar lengths (less padding), answers returned in the callers' order."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(
        self, chats: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, seed: int
    ) -> list[str]:
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        outputs: dict[int, str] = {}
        torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = self.model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                )
            for i, text in zip(idx, tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)):
                outputs[i] = text.strip()
        return [outputs[i] for i in range(len(texts))]

    def close(self) -> None:
        del self.model
        free_memory()


class VLLMEngine:
    """vLLM on the merged model folder (what ships). ``LLM.chat`` applies the model's chat template."""

    def __init__(self, model_dir: str, seed: int):
        from vllm import LLM

        self.llm = LLM(model=model_dir, seed=seed)

    def generate(
        self, chats: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, seed: int
    ) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        return [o.outputs[0].text.strip() for o in self.llm.chat(chats, params, use_tqdm=False)]

    def close(self) -> None:
        del self.llm
        free_memory()


def free_memory() -> None:
    """Give back what a dropped model held (the GPU cache too), before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
