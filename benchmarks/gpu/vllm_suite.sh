#!/usr/bin/env bash
# GPU: WikiText-2 PPL through vLLM against the Transformers path on SmolLM2-135M (full test split), after stage.sh
# staged every bin of pack_wheels.py and the GGUF halves. Usage: vllm_suite.sh [TIMEOUT_S per run].
# (The lighteval comparison runs lighteval_suite.sh with --backend hf|vllm.)
set -uo pipefail
source benchmarks/gpu/_setup.sh
python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1 || exit 1
R=/tmp/vres; mkdir -p $R; LIMIT=${1:-120}
CFGS=("fp:--w_bits 16 --a_bits 16 --kv_bits 16" "rtn:--w_bits 4 --a_bits 4 --kv_bits 4"
      "ffn_had:--w_bits 4 --a_bits 4 --kv_bits 4 --rotate_down_proj" "quarot:--w_bits 4 --a_bits 4 --kv_bits 4 --rotate")
for c in "${CFGS[@]}"; do
  name=${c%%:*}; flags=${c#*:}
  for b in hf vllm; do
    t0=$SECONDS
    timeout $LIMIT python3 -m osp_eval ppl $M $flags --w_rtn --backend $b --output_dir $R --no_progress 2>&1 | grep -E "ppl =|rror" | tail -2
    echo "   ppl $name $b: $((SECONDS-t0)) s"
  done
done
cd $R && find . -name "*.json" | tar czf $OUT/vllm_ppl.tgz -T -
