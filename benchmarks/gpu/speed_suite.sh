#!/usr/bin/env bash
# GPU: the speed acceptance of the fused kernels, both paths in one process per benchmark. Usage:
#   speed_suite.sh PART [PART ...]   with PART one of
#     checks    the once-per-GPU self-checks behind --kernels auto
#     ppl       bench_ppl, 1.4B shape, reference vs triton (fp, RTN, FFN Had, QuaRot)
#     compile   bench_ppl, triton path, eager and under torch.compile (fp, RTN, FFN Had, QuaRot)
#     compileref  the same on the reference path: Inductor generates (and fuses) the quantizers itself
#     gptq14    bench_gptq, 1.4B shape, both paths
#     spinquant bench_spinquant, 1.4B shape, both paths (3 steps)
#     gptqsmol  bench_gptq on SmolLM2 (needs the GGUF staged: stage.sh .gpu/p1, then carry .gpu/p2 .gpu/whl)
#     tables    the SmolLM2 table on both paths (the 0.1% check) and the 1.4B table with auto (needs SmolLM2, .gpu/data)
#     table14c  the 1.4B table with auto under --compile (after tables, on the same machine)
# benches = checks ppl compile gptq14 gptqsmol spinquant (the old single part).
set -uo pipefail
parts=" $* "; [ "$parts" = " benches " ] && parts=" checks ppl compile gptq14 gptqsmol spinquant "
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
case $parts in *" gptqsmol "*|*" tables "*|*" table14c "*) source benchmarks/gpu/_setup.sh ;; esac
nvidia-smi -L
R=/tmp/speed_res; mkdir -p $R
has() { case $parts in *" $1 "*) return 0 ;; esac; return 1; }
if has checks; then
  python3 - <<'PY'
import torch, osp_eval.kernels as K
d = torch.device("cuda")
print("self-checks on this GPU: act-quant kernel == reference:", K._auto_ok(d), "| its backward ~ autograd:",
      K._auto_grad_ok(d), "| R3 Q/K Hadamard kernel == reference:", K._hadamard_auto_ok(d),
      "| GPTQ block variant (fma):", K.gptq_variant(d))
PY
fi
if has ppl; then
  python3 benchmarks/bench_ppl.py --methods fp,rtn,ffn_had,quarot_rtn --kernels reference,triton --nwindows 40 2>&1 | grep -v Warn | tail -10
  mv benchmarks/results/bench_ppl_random-osp-1_4b_cuda.json benchmarks/results/bench_ppl_random-osp-1_4b_cuda_paths.json
fi
if has compile; then
  timeout 420 python3 benchmarks/bench_ppl.py --methods fp,rtn,ffn_had,quarot_rtn --kernels triton --compile --nwindows 40 2>&1 | grep -E "^(fp|rtn|ffn_had|quarot_rtn) |slowdown"
  mv benchmarks/results/bench_ppl_random-osp-1_4b_cuda.json benchmarks/results/bench_ppl_random-osp-1_4b_cuda_compile.json
fi
if has compileref; then
  timeout 420 python3 benchmarks/bench_ppl.py --methods rtn,ffn_had,quarot_rtn --kernels reference --compile --nwindows 40 2>&1 | grep -E "^(rtn|ffn_had|quarot_rtn) |slowdown"
  mv benchmarks/results/bench_ppl_random-osp-1_4b_cuda.json benchmarks/results/bench_ppl_random-osp-1_4b_cuda_compileref.json
fi
if has gptq14; then
  python3 benchmarks/bench_gptq.py --kernels reference,triton 2>&1 | grep -a "kernels=" | sed 's/.*GPTQ W4/GPTQ W4/'
fi
if has gptqsmol; then
  python3 benchmarks/bench_gptq.py --model $M --kernels reference,triton 2>&1 | grep -a "kernels=" | sed 's/.*GPTQ W4/GPTQ W4/'
fi
if has spinquant; then
  python3 benchmarks/bench_spinquant.py --micro_batch_sizes 8 --steps 3 --kernels reference,triton 2>&1 | grep -v Warn | tail -3
fi
if has tables; then
  for k in reference triton; do
    t0=$SECONDS
    python3 -m osp_eval table $M --bits 4-4-4 --methods rtn,ffn_had,gptq,quarot --calib_data c4 --kernels $k \
      --output_dir $R/smollm2_$k --no_progress 2>&1 | grep -v Warn | tail -12
    echo "   smollm2 table kernels=$k: $((SECONDS-t0)) s wall"
  done
  [ -f /tmp/osp14b/config.json ] || python3 benchmarks/gpu/make_random_1p4b.py /tmp/osp14b $M 2>&1 | tail -1
  t0=$SECONDS
  python3 -m osp_eval table /tmp/osp14b --bits 4-4-4 --methods rtn,ffn_had,gptq,quarot --calib_data c4 --kernels auto \
    --output_dir $R/osp14b_auto --no_progress 2>&1 | grep -v Warn | tail -14
  echo "   1.4B table kernels=auto: $((SECONDS-t0)) s wall"
fi
if has table14c; then
  t0=$SECONDS
  python3 -m osp_eval table /tmp/osp14b --bits 4-4-4 --methods rtn,ffn_had,gptq,quarot --calib_data c4 --kernels auto \
    --compile --output_dir $R/osp14b_auto_compile --no_progress 2>&1 | grep -v Warn | tail -14
  echo "   1.4B table kernels=auto --compile: $((SECONDS-t0)) s wall"
fi
cp -r benchmarks/results $R/ 2>/dev/null; tar czf $OUT/speed_$(echo $* | tr " " _).tgz -C $R . && rm -rf $R
