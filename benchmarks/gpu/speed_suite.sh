#!/usr/bin/env bash
# GPU: the speed acceptance of the fused kernels, both paths in one process per benchmark (after
# `stage.sh .gpu/p1`; carry .gpu/p2 .gpu/whl .gpu/data). Usage: speed_suite.sh benches|tables
set -uo pipefail
source benchmarks/gpu/_setup.sh
nvidia-smi -L
mkdir -p $OUT/res
if [ "$1" = benches ]; then
  python3 - <<'PY'
import torch, osp_eval.kernels as K
d = torch.device("cuda")
print("self-checks on this GPU: act-quant kernel == reference:", K._auto_ok(d), "| its backward ~ autograd:",
      K._auto_grad_ok(d), "| R3 Q/K Hadamard kernel == reference:", K._hadamard_auto_ok(d),
      "| GPTQ block variant (fma):", K.gptq_variant(d))
PY
  python3 benchmarks/bench_ppl.py --methods fp,rtn,ffn_had,quarot_rtn --kernels reference,triton --nwindows 40 2>&1 | grep -v Warn | tail -10
  mv benchmarks/results/bench_ppl_random-osp-1_4b_cuda.json benchmarks/results/bench_ppl_random-osp-1_4b_cuda_paths.json
  python3 benchmarks/bench_ppl.py --methods fp,rtn --kernels triton --compile --nwindows 40 2>&1 | grep -E "^(fp|rtn) "
  python3 benchmarks/bench_gptq.py --kernels reference,triton 2>&1 | grep -a "kernels=" | sed 's/.*GPTQ W4/GPTQ W4/'
  python3 benchmarks/bench_gptq.py --model $M --kernels reference,triton 2>&1 | grep -a "kernels=" | sed 's/.*GPTQ W4/GPTQ W4/'
  python3 benchmarks/bench_spinquant.py --micro_batch_sizes 8 --steps 3 --kernels reference,triton 2>&1 | grep -v Warn | tail -3
fi
if [ "$1" = tables ]; then
  for k in reference triton; do
    t0=$SECONDS
    python3 -m osp_eval table $M --bits 4-4-4 --methods rtn,ffn_had,gptq,quarot --calib_data c4 --kernels $k \
      --output_dir $OUT/res/smollm2_$k --no_progress 2>&1 | grep -v Warn | tail -12
    echo "   smollm2 table kernels=$k: $((SECONDS-t0)) s wall"
  done
  [ -f /tmp/osp14b/config.json ] || python3 benchmarks/gpu/make_random_1p4b.py /tmp/osp14b $M 2>&1 | tail -1
  t0=$SECONDS
  python3 -m osp_eval table /tmp/osp14b --bits 4-4-4 --methods rtn,ffn_had,gptq,quarot --calib_data c4 --kernels auto \
    --output_dir $OUT/res/osp14b_auto --no_progress 2>&1 | grep -v Warn | tail -14
  echo "   1.4B table kernels=auto: $((SECONDS-t0)) s wall"
fi
cp -r benchmarks/results $OUT/ 2>/dev/null || true
