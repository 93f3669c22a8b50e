"""GRPO's vLLM pieces that run in the training child: the knobs and CPU weight-sync patches set up
before TRL builds its vLLM engine, and the optional check that vLLM generates with the trained policy
(``grpo.vllm.verify_sync``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.grpo.plan import GRPOParams

LOG = "[tuneline.grpo]"


def setup_vllm(cfg: GRPOParams, plan: dict[str, Any], on_cpu: bool, scratch: Path) -> None:
    """Knobs TRL's colocate ``LLM(...)`` lacks, and on CPU the weight-sync patches (tasks/runtime/vllm_cpu.py)."""
    from tasks.runtime import vllm_cpu

    if plan["mode"] == "colocate":
        vllm_cpu.patch_colocate_llm_kwargs(dtype=cfg.vllm.dtype, enforce_eager=cfg.vllm.enforce_eager)
        if on_cpu:
            vllm_cpu.patch_colocate_sync()
    elif on_cpu:
        vllm_cpu.patch_server_sync_via_lora(scratch / "lora-sync")


def verify_vllm_sync(
    trainer: Any, tokenizer: Any, rows: list[dict[str, Any]], n_prompts: int = 2, max_tokens: int = 12
) -> dict[str, Any]:
    """Sync the trained policy to vLLM, then compare vLLM's temperature-0 completion with transformers'
    greedy completion of the same policy (LoRA merged), and of the base model (adapter off)."""
    import torch
    from vllm import SamplingParams

    policy = trainer.model
    prompt_ids = [
        tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows[:n_prompts]
    ]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_ids]
    vgen = trainer.vllm_generation
    vgen.sync_weights()
    outs = vgen.llm.generate(
        [{"prompt_token_ids": ids} for ids in prompt_ids],
        sampling_params=SamplingParams(temperature=0.0, max_tokens=max_tokens),
        use_tqdm=False,
    )
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]

    def greedy() -> list[list[int]]:
        res = []
        for ids in prompt_ids:
            g = policy.generate(
                torch.tensor([ids], device=policy.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=policy.device),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids) :].tolist()
            res.append(
                g[: len(g) - next((i for i, t in enumerate(reversed(g)) if t != tokenizer.pad_token_id), 0)] if g else g
            )
        return res

    policy.eval()
    with torch.no_grad():
        policy.merge_adapter()
        try:
            hf_policy = greedy()
        finally:
            policy.unmerge_adapter()
        with policy.disable_adapter():
            hf_base = greedy()
    strip = lambda seq: [t for t in seq if t != tokenizer.pad_token_id]  # noqa: E731
    result = {
        "prompts": len(prompt_ids),
        "identical": sum(strip(v) == strip(h) for v, h in zip(vllm_ids, hf_policy)),
        "policy_differs_from_base": sum(strip(h) != strip(b) for h, b in zip(hf_policy, hf_base)),
        "vllm": [tokenizer.decode(v) for v in vllm_ids],
        "transformers_policy": [tokenizer.decode(h) for h in hf_policy],
        "transformers_base": [tokenizer.decode(b) for b in hf_base],
    }
    print(
        f"{LOG} vLLM sync check: {result['identical']}/{result['prompts']} prompts identical to transformers greedy",
        flush=True,
    )
    return result
