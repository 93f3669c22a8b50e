"""Data stage at scale: peak memory and time per row of tuneline's stage (``tasks.data.prepare``, the
streaming one) beside the script a user would write with ``datasets`` (``load_dataset(...).map(tokenize)``),
at 100k and 1M rows (10M with ``--sizes``), one run per size each, each run in its own process.

Data: the alpaca demo rows of ../shared/data (English and Chinese, realistic lengths), each made unique
by a suffix, as chat ``messages`` rows in JSON-lines shards of 100k rows (``part-*.jsonl``). Both sides
render SmolLM2's chat template and count tokens with its tokenizer, drop rows over 2048 tokens and write
JSON lines; tuneline also validates, dedupes, splits and writes its report.

The prediction is written down before measuring (``PREDICTION``); the results go to a JSON file.

    python bench/data_scale.py                       # 100k and 1M rows, both sides
    python bench/data_scale.py --sizes 100000 --sides tuneline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca"
SHARD = 100_000
#: Written before the first measurement: tuneline's peak flat (~0.65 GB whatever the size, the libraries'
#: and tokenizer's share), the datasets script's flat too (Arrow on disk), tuneline ~1.3x its time per row.
PREDICTION = {
    "tuneline": {"peak_gb": {"100000": 0.65, "1000000": 0.7}, "ms_per_row": 0.4},
    "datasets": {"peak_gb": {"100000": 0.9, "1000000": 1.0}, "ms_per_row": 0.3},
}

#: The child's own peak resident memory. Not ru_maxrss: a child started by subprocess inherits its parent's
#: resident size at exec (a parent that converted the GGUF model first made a 3M-row run read 1.64 GB).
HWM = """
def hwm_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
"""

TUNELINE = (
    HWM
    + """
import json, sys, time
from pathlib import Path
from tasks.data import DataParams, prepare
t, c = time.time(), time.process_time()
m = prepare(DataParams(datasets=[sys.argv[1]], max_length=2048), Path(sys.argv[2]), model=sys.argv[3])
peak = hwm_mb()
print(json.dumps({"rows_out": m["train_rows"] + m["validation_rows"], "wall_s": time.time() - t,
                  "cpu_s": time.process_time() - c, "peak_rss_mb": peak}))
"""
)

DATASETS = (
    HWM
    + """
import json, sys, time
from pathlib import Path
t, c = time.time(), time.process_time()
from datasets import load_dataset
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[3])
ds = load_dataset("json", data_files=sys.argv[1] + "/part-*.jsonl", split="train", cache_dir=sys.argv[2] + "/cache")
def tokenize(batch):
    texts = [tok.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
    return {"input_ids": tok(texts, add_special_tokens=False)["input_ids"]}
ds = ds.map(tokenize, batched=True).filter(lambda r: len(r["input_ids"]) <= 2048)
ds.remove_columns("input_ids").to_json(sys.argv[2] + "/train.jsonl", force_ascii=False)
print(json.dumps({"rows_out": len(ds), "wall_s": time.time() - t, "cpu_s": time.process_time() - c,
                  "peak_rss_mb": hwm_mb()}))
"""
)


def write_shards(folder: Path, rows: int) -> None:
    """``rows`` unique chat rows from the demo data, 100k to a shard, written as they are made."""
    base = json.loads((SHARED / "alpaca_en_demo.json").read_text()) + json.loads(
        (SHARED / "alpaca_zh_demo.json").read_text()
    )
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, rows, SHARD):
        with open(folder / f"part-{start // SHARD:04d}.jsonl", "w", encoding="utf-8") as f:
            for i in range(start, min(rows, start + SHARD)):
                r = base[i % len(base)]
                prompt = f"{r['instruction']} (#{i})" + (f"\n{r['input']}" if r["input"] else "")
                turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]
                f.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")


def run(side: str, source: Path, out: Path, model: Path) -> dict:
    script = TUNELINE if side == "tuneline" else DATASETS
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(source), str(out), str(model)], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"{side} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--sides", default="tuneline,datasets")
    parser.add_argument("--results", default=str(ROOT / "bench" / "data_scale.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tasks.core.models import SMOLLM2_PACKAGE, resolve_model

    model = resolve_model(SMOLLM2_PACKAGE)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"
    results = {"machine": machine, "prediction": PREDICTION, "runs": []}
    print(json.dumps({"prediction": PREDICTION}), flush=True)
    for size in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="tuneline-scale-") as tmp:
            source = Path(tmp) / "source"
            write_shards(source, size)
            for side in args.sides.split(","):
                got = run(side, source, Path(tmp) / side, model)
                got |= {"side": side, "rows": size, "ms_per_row": 1000 * got["wall_s"] / size}
                got["cpu_ms_per_row"] = 1000 * got["cpu_s"] / size
                got["load_average"] = os.getloadavg()[0]
                results["runs"].append(got)
                print(json.dumps(got), flush=True)
                Path(args.results).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
