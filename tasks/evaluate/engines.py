"""Generation engines and model loading: transformers — padded batched ``generate`` (``transformers``)
or continuous batching (``continuous``: ``generate_batch``, no padding, a finished answer frees its
slot at once) — or vLLM on the merged folder. ``select_engine`` picks: vLLM when installed and a GPU is
present, else padded ``generate`` (continuous batching ran slower than it on an H200: docs/evaluation.md)."""

from __future__ import annotations

import gc
import importlib.util
from typing import Any, Callable, Collection, Sequence

from tasks.core.common import load_tokenizer, torch_dtype
from tasks.evaluate.params import Engine, EvalError
from tasks.runtime.hardware import card_dtype


def select_engine(
    requested: Engine, find_spec: Callable[[str], Any] = importlib.util.find_spec, has_gpu: bool | None = None
) -> str:
    """``transformers``, ``continuous`` or ``vllm``. ``auto`` takes vLLM only when it is installed and a
    GPU is present (vLLM has no useful CPU path here), else padded ``generate`` — continuous batching
    is there on request: on an H200 it decoded at 0.53x padded generate's rate (docs/evaluation.md,
    "Engines"); ``vllm`` without vLLM installed is an error.

    >>> select_engine("auto", find_spec=lambda name: None, has_gpu=True)
    'transformers'
    """
    installed = find_spec("vllm") is not None
    if requested == "vllm" and not installed:
        raise EvalError("eval.engine=vllm but vLLM is not installed (pip install 'tuneline[vllm]'), or use engine=auto")
    if requested != "auto":
        return requested
    if has_gpu is None:
        import torch

        has_gpu = torch.cuda.is_available()
    if not has_gpu:
        return "transformers"
    return "vllm" if installed else "transformers"


class Completion(str):
    """A generated answer: the text, plus ``cut_off`` — True when generation stopped because it hit
    ``max_new_tokens`` (not on a stop token), so the answer may be unfinished. Scoring treats a
    cut-off answer without a final answer as wrong; everything else just sees a ``str``.

    String methods return plain ``str`` (``.strip()`` drops the flag), so read it first.

    >>> c = Completion("2 + 2 = 4, so", cut_off=True)
    >>> c == "2 + 2 = 4, so", c.cut_off, Completion("#### 4").cut_off
    (True, True, False)
    >>> import json, pickle
    >>> json.dumps([c]), pickle.loads(pickle.dumps(c)).cut_off
    ('["2 + 2 = 4, so"]', True)
    """

    cut_off: bool

    def __new__(cls, text: str = "", cut_off: bool = False) -> Completion:
        obj = super().__new__(cls, text)
        obj.cut_off = bool(cut_off)
        return obj

    def __repr__(self) -> str:
        return f"Completion({str.__repr__(self)}, cut_off={self.cut_off})"


def hit_token_limit(new_ids: Sequence[int], stop_ids: Collection[int], max_new_tokens: int) -> bool:
    """Whether ``generate`` stopped at the token limit: ``max_new_tokens`` new tokens and none of
    them a stop token. (A row that stopped early is padded up to the batch's longest, after its stop
    token, so it still holds one.)

    >>> hit_token_limit([5, 6, 7], {2}, 3), hit_token_limit([5, 6, 2], {2}, 3), hit_token_limit([5, 2, 0], {2}, 3)
    (True, False, False)
    >>> hit_token_limit([5, 6], {2}, 3)  # shorter than the limit: the batch stopped on its own
    False
    """
    return len(new_ids) >= max_new_tokens and not any(t in stop_ids for t in new_ids)


def stop_token_ids(model) -> set[int]:
    """The token ids ``model.generate`` stops on (its generation config's ``eos_token_id``: one id,
    a list, or none)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple, set)) else {int(eos)}


def vllm_completion(output) -> Completion:
    """One vLLM ``RequestOutput`` as a :class:`Completion`: its first sample's text, cut off when
    vLLM says it finished for ``"length"`` (``max_tokens`` reached) rather than ``"stop"``.

    >>> from types import SimpleNamespace as NS
    >>> vllm_completion(NS(outputs=[NS(text=" 4 ", finish_reason="length")]))
    Completion('4', cut_off=True)
    """
    first = output.outputs[0]
    return Completion(first.text.strip(), cut_off=first.finish_reason == "length")


def evaluation_dtype(device: str) -> str:
    """The precision models are evaluated in: the card's (``tasks.runtime.hardware.card_dtype``: bf16 from
    compute capability 8.0, fp16 below, where ``is_bf16_supported()`` says yes by emulation), fp32 on CPU."""
    import torch

    return card_dtype(torch.cuda.get_device_capability() if device == "cuda" else None)


def load_model(model_dir: str, device: str, dtype: str | None = None) -> tuple[Any, Any]:
    """The model in ``dtype`` (default ``evaluation_dtype(device)``), in eval mode, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    dtype = dtype or evaluation_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).to(device).eval()
    return model, tokenizer


class TransformersEngine:
    """transformers generation, each answer a :class:`Completion` that knows whether it hit
    ``max_new_tokens``, in the callers' order.

    Padded (default): batched ``model.generate`` with left padding, prompts sorted by length so a
    batch holds similar lengths. ``continuous=True``: ``model.generate_batch`` (continuous batching,
    paged KV cache): all prompts at once, no padding, a finished answer's slot goes to the next one.
    Greedy answers are the same tokens where the arithmetic is (fp32 on CPU: tests/test_rollouts.py);
    in bf16 the different kernels and batch shapes can flip a near-tie, as between batch sizes."""

    def __init__(self, model, tokenizer, batch_size: int, continuous: bool = False):
        self.model, self.tokenizer, self.batch_size, self.continuous = model, tokenizer, batch_size, continuous
        self.on_items = None  # called with the number of answers each batch adds

    def generate(
        self, chats: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, seed: int
    ) -> list[Completion]:
        tok = self.tokenizer
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        if self.continuous:
            return self._generate_continuous(texts, max_new_tokens, temperature, seed)
        import torch

        tok.padding_side = "left"
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        outputs: dict[int, Completion] = {}
        torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        stops = stop_token_ids(self.model)
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
            new = out[:, batch["input_ids"].shape[1] :]
            for i, ids, text in zip(idx, new.tolist(), tok.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = Completion(text.strip(), cut_off=hit_token_limit(ids, stops, max_new_tokens))
            if self.on_items:  # the suite's progress bar (suites.suite_progress)
                self.on_items(len(idx))
        return [outputs[i] for i in range(len(texts))]

    def _generate_continuous(
        self, texts: list[str], max_new_tokens: int, temperature: float, seed: int
    ) -> list[Completion]:
        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig

        tok = self.tokenizer
        prompts = tok(texts, add_special_tokens=False)["input_ids"]  # the padded path's ids, without the padding
        stops = stop_token_ids(self.model)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            eos_token_id=sorted(stops) or None,
            pad_token_id=tok.pad_token_id,
        )
        sizing: dict[str, Any] = {}
        if next(self.model.parameters()).device.type == "cpu":
            # transformers sizes the cache from the machine's RAM on CPU (most of it, filled before use):
            # count the 256-token blocks every prompt and answer needs instead.
            blocks = sum(-(-(len(p) + max_new_tokens) // 256) for p in prompts)
            sizing = {"num_blocks": blocks, "max_batch_tokens": 512}
        with torch.no_grad():
            results = self.model.generate_batch(
                prompts,
                generation_config=config,
                continuous_batching_config=ContinuousBatchingConfig(seed=seed, **sizing),
                progress_bar=False,
            )
        outputs = list(results.values())  # in the inputs' order
        if len(outputs) != len(prompts) or any(o.error for o in outputs):
            errors = sorted({str(o.error) for o in outputs if o.error})
            raise EvalError(f"continuous batching returned {len(outputs)} of {len(prompts)} answers: {errors}")
        return [
            Completion(
                tok.decode(o.generated_tokens, skip_special_tokens=True).strip(),
                cut_off=hit_token_limit(o.generated_tokens, stops, max_new_tokens),
            )
            for o in outputs
        ]

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
    ) -> list[Completion]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        return [vllm_completion(o) for o in self.llm.chat(chats, params, use_tqdm=False)]

    def close(self) -> None:
        del self.llm
        free_memory()


def free_memory() -> None:
    """Give back what a dropped model held (the GPU cache too), before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
