"""GRPO rollout engines built on TRL's padded ``generate`` (issue 31, part 4): a static KV cache with a
compiled decode step (``static``), the LoRA adapter merged into the base weights for the rollout
(``merged``), or both (``static+merged``).

Why: without vLLM a GRPO rollout on a GPU is bound by the host, not the card (~5 decode steps a second
on a 1.5B model: eager PyTorch launches a few thousand small kernels per step, 196 of them the unmerged
LoRA products). The two levers attack that from both ends:

* ``static``: transformers' ``cache_implementation="static"`` plus its own ``torch.compile`` of the
  decode step (``GenerationConfig.compile_config``; mode ``reduce-overhead`` = CUDA graphs), so a decode
  step is a graph replay instead of thousands of launches. TRL builds its generation config with
  ``disable_compile=True`` and has no knob to undo it, so :func:`setup_rollouts` flips it on the
  trainer's config after construction. The cache is sized once for the longest prompt plus the
  completion limit (``max_cache_len``, where the installed transformers has it), so a longer prompt
  later does not re-allocate the cache and recompile. On CPU the decode step is not compiled by
  default (inductor's C++ build costs minutes on a real model and there are no CUDA graphs to gain):
  the static cache runs eager there, and the metrics say so.
* ``merged``: peft's ``merge_adapter`` before ``generate`` and ``unmerge_adapter`` after (TRL has no
  hook for it: :func:`setup_rollouts` wraps ``GRPOTrainer._generate_single_turn``, the one call that
  generates). Merge and unmerge are in place, so a bf16 base weight comes back rounded
  (``round(round(w + d) - d) != w``), and that error would random-walk over hundreds of steps; the
  frozen base weights are therefore copied once (to host memory, pinned on a GPU machine) and written
  back after every unmerge: the base and the adapter are bit-identical after each rollout. Cost: one
  host copy of the targeted base weights (3 GiB for a 1.5B model in bf16) and one host-to-device copy
  per rollout (~0.1 s for 3 GiB).

Which engine ``auto`` picks is decided in ``tasks/grpo/plan.py`` (``AUTO_GPU_ENGINE``).
"""

from __future__ import annotations

import time
from typing import Any

#: Engines that run TRL's padded ``generate`` path, with what each adds to it.
STATIC_CACHE = ("static", "static+merged")
MERGED = ("merged", "static+merged")


def grpo_config_kwargs(engine: str) -> dict[str, Any]:
    """What the engine adds to ``GRPOConfig`` (TRL forwards ``cache_implementation`` to its generation config).

    >>> grpo_config_kwargs("static+merged"), grpo_config_kwargs("merged")
    ({'cache_implementation': 'static'}, {})
    """
    return {"cache_implementation": "static"} if engine in STATIC_CACHE else {}


def max_prompt_tokens(tokenizer: Any, rows: list[dict[str, Any]]) -> int:
    """The longest prompt in tokens, as TRL tokenizes it (the chat template with the generation prompt).
    transformers 5 returns a ``BatchEncoding`` there (whose ``len`` is its number of keys), 4.x a list."""

    def length(row: dict[str, Any]) -> int:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    return max(length(r) for r in rows)


def setup_rollouts(
    trainer: Any, engine: str, tokenizer: Any = None, rows: list[dict[str, Any]] | None = None, compile_on_cpu=False
) -> dict[str, Any]:
    """Turn a ``GRPOTrainer`` built with :func:`grpo_config_kwargs` into ``engine``'s rollouts (nothing to
    do for the other engines); return what was set up (for the log and the metrics): ``static_cache``,
    ``compiled``, ``merged``, ``max_cache_len`` (the longest of ``rows``' prompts plus the completion
    limit) and ``merge_seconds`` (a live total, grows as rollouts run)."""
    info: dict[str, Any] = {"static_cache": engine in STATIC_CACHE, "compiled": False, "merged": engine in MERGED}
    if engine in STATIC_CACHE:
        cache_len = max_prompt_tokens(tokenizer, rows) + trainer.max_completion_length if rows else None
        info.update(_compiled_static_cache(trainer, cache_len, compile_on_cpu))
    if engine in MERGED:
        info["merge_seconds"] = 0.0
        _merge_around_generation(trainer, info)
    return info


def _compiled_static_cache(trainer: Any, max_cache_len: int | None, compile_on_cpu: bool) -> dict[str, Any]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    config = trainer.generation_config
    if config.cache_implementation != "static":
        raise ValueError("the static engine needs GRPOConfig(cache_implementation='static') (grpo_config_kwargs)")
    on_gpu = trainer.accelerator.device.type == "cuda"
    compiled = on_gpu or compile_on_cpu
    # TRL sets disable_compile=True on the rollout config; transformers compiles the decode step only
    # with a compilable (static) cache, on CUDA, or anywhere when _compile_all_devices is set.
    config.disable_compile = not compiled
    if compiled:
        config.compile_config = CompileConfig()  # fullgraph off, mode reduce-overhead (CUDA graphs on a GPU)
        if not on_gpu:
            config.compile_config._compile_all_devices = True
    # One cache length for the whole run: a longer prompt later would otherwise re-allocate the cache
    # and recompile. transformers 5.17 (the GPU machine's) and 5.25 read max_cache_len; a version
    # without it grows the cache to the longest seen so far (a few recompiles, not one per step).
    has_max_cache_len = "max_cache_len" in GenerationConfig().__dict__
    if max_cache_len is not None and has_max_cache_len:
        config.max_cache_len = max_cache_len
    return {"compiled": compiled, "max_cache_len": max_cache_len if has_max_cache_len else None}


def _merge_around_generation(trainer: Any, info: dict[str, Any]) -> None:
    import torch

    model = trainer.model
    if not hasattr(model, "merge_adapter"):
        raise ValueError("the merged rollout engines need a peft (LoRA) model")
    saved = stash_base_weights(model)
    single_turn = trainer._generate_single_turn

    def merged_single_turn(*args, **kwargs):
        t = time.perf_counter()
        with torch.no_grad():
            model.merge_adapter()
        info["merge_seconds"] += time.perf_counter() - t
        try:
            return single_turn(*args, **kwargs)
        finally:
            t = time.perf_counter()
            with torch.no_grad():
                model.unmerge_adapter()
                restore_base_weights(saved)
            info["merge_seconds"] += time.perf_counter() - t

    trainer._generate_single_turn = merged_single_turn


def stash_base_weights(model: Any) -> list[tuple[Any, Any]]:
    """(base weight, its host copy) for every LoRA layer's base layer; the copy is pinned when CUDA is there,
    so :func:`restore_base_weights` is one fast host-to-device copy."""
    import torch
    from peft.tuners.lora import LoraLayer

    pin = torch.cuda.is_available()
    out = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            copy = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=pin)
            copy.copy_(weight.detach())
            out.append((weight, copy))
    if not out:
        raise ValueError("the merged rollout engines found no LoRA layer in the model")
    return out


def restore_base_weights(saved: list[tuple[Any, Any]]) -> None:
    """Write the stashed base weights back in place (same storage: compiled graphs keep pointing at them)."""
    for weight, copy in saved:
        weight.data.copy_(copy, non_blocking=True)
    if saved and saved[0][0].is_cuda:
        import torch

        torch.cuda.synchronize()
