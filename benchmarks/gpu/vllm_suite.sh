#!/usr/bin/env bash
# GPU: the vLLM fast path against the Transformers path on SmolLM2-135M, after stage.sh staged every bin of
# pack_wheels.py (vllm 0.26.0 + lighteval + their dependencies), the GGUF halves and the lighteval data.
# Usage: vllm_suite.sh ppl|lighteval [TIMEOUT_S]. KV stays 16-bit: K-cache quantization is HF-only.
set -uo pipefail
source benchmarks/gpu/_setup.sh
python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1 || exit 1
R=/tmp/vres; mkdir -p $R; LIMIT=${2:-280}
CFGS=("fp:--w_bits 16 --a_bits 16 --kv_bits 16" "rtn:--w_bits 4 --a_bits 4 --kv_bits 16"
      "ffn_had:--w_bits 4 --a_bits 4 --kv_bits 16 --rotate_down_proj" "quarot:--w_bits 4 --a_bits 4 --kv_bits 16 --rotate")
for c in "${CFGS[@]}"; do
  name=${c%%:*}; flags=${c#*:}
  for b in hf vllm; do
    t0=$SECONDS
    if [ "$1" = ppl ]; then
      timeout $LIMIT python3 -m osp_eval ppl $M $flags --w_rtn --backend $b --output_dir $R --no_progress 2>&1 | grep -E "ppl =|rror" | tail -2
    else
      S=lighteval_ptq.py; [ $b = vllm ] && S=lighteval_ptq_vllm.py
      timeout $LIMIT python3 $S $M $flags --tasks tasks/tasks.txt --data_dir /tmp/ldata --batch_size 64 --gen_batch_size 256 \
        --output_dir $R/$name-$b --no_progress 2>&1 | grep -E "average|timings|rror" | tail -4
    fi
    echo "   $1 $name $b: $((SECONDS-t0)) s"
  done
done
cd $R && find . -name "*.json" | tar czf $OUT/vllm_$1.tgz -T -
